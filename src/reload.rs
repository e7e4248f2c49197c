//! Secrets and keys given as files, re-read when the file changes so a rotation needs no
//! restart. Readers get the old or the new value whole: an `ArcSwap`, whose loads take no lock
//! and write no shared counter, so every request can read it; a new file that cannot be used
//! keeps the old value.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use std::time::{Duration, SystemTime};

/// How often watched files are checked: a rotated secret takes effect within this.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// What a file looked like: it is re-read when this changes. The inode catches a file
/// replaced by a rename (a Kubernetes secret volume's symlink swap, `mv`) with the same size
/// within the file system's timestamp granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    modified: SystemTime,
    len: u64,
    inode: u64,
}

/// The stamp of the file `path` names (following symlinks), if it can be read.
pub fn file_stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp {
        modified: meta.modified().ok()?,
        len: meta.len(),
        inode,
    })
}

/// Reads and parses a watched file; the error says what is wrong with the file (never its
/// content: it holds secrets).
pub type Parse<T> = fn(&Path, &[u8]) -> Result<T, String>;

/// A parser that may read other settings' current values (the operators file refuses a token
/// that is the API token's, whatever that file says now).
type Parser<T> = Box<dyn Fn(&Path, &[u8]) -> Result<T, String> + Send + Sync>;

/// A value read from a file and kept current with it.
pub struct WatchedFile<T> {
    setting: &'static str,
    path: PathBuf,
    parse: Parser<T>,
    current: ArcSwap<T>,
    /// The stamp last read, used or refused: a refused file is reported once, not per check.
    seen: Mutex<Option<Stamp>>,
    /// The file's current content could not be used: an older one is served. Kept off only
    /// by an ERROR log, a revocation that did not take would go unseen, so it is a gauge too.
    stale: AtomicBool,
}

/// Secrets, keys and key sets are small; a larger file is a wrong path, not a secret.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

fn read<T>(path: &Path, parse: &Parser<T>) -> Result<T, String> {
    use std::io::Read as _;
    let unreadable = |e: std::io::Error| {
        format!(
            "cannot read {}: {e}; point it at a readable file",
            path.display()
        )
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "{} is larger than {MAX_FILE_BYTES} bytes; point it at the secret's own file",
            path.display()
        ));
    }
    parse(path, &bytes)
}

impl<T: Send + Sync> WatchedFile<T> {
    /// Reads the file now; its error is a setting error at start.
    pub fn load(
        setting: &'static str,
        path: &Path,
        parse: impl Fn(&Path, &[u8]) -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let parse: Parser<T> = Box::new(parse);
        let stamp = file_stamp(path);
        let value = read(path, &parse)?;
        Ok(Self {
            setting,
            path: path.to_owned(),
            parse,
            current: ArcSwap::from_pointee(value),
            seen: Mutex::new(stamp),
            stale: AtomicBool::new(false),
        })
    }

    /// Whether the file's current content could not be used (an older one is served).
    pub fn stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    /// The setting naming this file.
    pub fn setting(&self) -> &'static str {
        self.setting
    }

    /// The value of the newest file that could be used, for a short use (a guard is cheap
    /// but not meant to be held across awaits).
    pub fn current(&self) -> arc_swap::Guard<Arc<T>> {
        self.current.load()
    }

    /// Re-reads the file if it changed since last read, or while its content is refused (a
    /// tokens file is checked against other settings, whose own change can make it good);
    /// true when the value was replaced.
    pub fn reload_if_changed(&self) -> bool {
        let stamp = file_stamp(&self.path);
        let changed = {
            let mut seen = match self.seen.lock() {
                Ok(seen) => seen,
                Err(poisoned) => poisoned.into_inner(),
            };
            let changed = *seen != stamp;
            if !changed && !self.stale() {
                return false;
            }
            *seen = stamp;
            changed
        };
        let read = read(&self.path, &self.parse);
        if file_stamp(&self.path) != stamp {
            // Written while we read it (an in-place `echo new > file` is a truncate, then a
            // write): what we read may be half of it. Read it again at the next check.
            if let Ok(mut seen) = self.seen.lock() {
                *seen = None;
            }
            return false;
        }
        match read {
            Ok(fresh) => {
                self.current.store(Arc::new(fresh));
                self.stale.store(false, Ordering::Relaxed);
                tracing::info!(
                    setting = self.setting,
                    path = %self.path.display(),
                    "secret file changed: now using its new content"
                );
                true
            }
            // Still refused, unchanged: said already.
            Err(_) if !changed => false,
            Err(error) => {
                self.stale.store(true, Ordering::Relaxed);
                tracing::error!(
                    setting = self.setting,
                    %error,
                    "secret file changed but cannot be used; keeping the previous value until it is fixed"
                );
                false
            }
        }
    }
}

/// Something holding watched files.
pub trait Reload: Send + Sync {
    fn reload_if_changed(&self);
    /// Each watched file's setting and whether it is stale (see [`WatchedFile::stale`]).
    fn staleness(&self, out: &mut Vec<(&'static str, bool)>);
}

impl<T: Send + Sync> Reload for WatchedFile<T> {
    fn reload_if_changed(&self) {
        WatchedFile::reload_if_changed(self);
    }

    fn staleness(&self, out: &mut Vec<(&'static str, bool)>) {
        out.push((self.setting, self.stale()));
    }
}

/// Checks every watched file each `every`; ends once all of them are dropped.
pub fn spawn_watcher(watched: Vec<Weak<dyn Reload>>, every: Duration) {
    if watched.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let mut alive = false;
            for weak in &watched {
                if let Some(watched) = weak.upgrade() {
                    alive = true;
                    // File reads block; a secret file is small, but the runtime's threads
                    // serve requests.
                    let _ = tokio::task::spawn_blocking(move || watched.reload_if_changed()).await;
                }
            }
            if !alive {
                return;
            }
        }
    });
}

/// A secret given directly (fixed for the process's life) or by a watched file.
#[derive(Clone)]
pub enum Secret<T> {
    Fixed(Arc<T>),
    File(Arc<WatchedFile<T>>),
}

impl<T: Send + Sync + 'static> Secret<T> {
    /// Runs `use_it` on the current value.
    pub fn with<R>(&self, use_it: impl FnOnce(&T) -> R) -> R {
        match self {
            Secret::Fixed(value) => use_it(value),
            Secret::File(file) => use_it(&file.current()),
        }
    }

    /// The file to watch, if the secret comes from one.
    pub fn watched(&self) -> Option<Weak<dyn Reload>> {
        match self {
            Secret::Fixed(_) => None,
            Secret::File(file) => {
                let file: Arc<dyn Reload> = file.clone();
                Some(Arc::downgrade(&file))
            }
        }
    }
}

/// Splits a list of secrets, comma or newline separated, as the environment variables take
/// them; blanks are dropped.
pub fn split_secrets(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split([',', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The UTF-8 text of a secret file.
pub fn utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str, String> {
    std::str::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(path: &Path, bytes: &[u8]) -> Result<Vec<String>, String> {
        let words: Vec<String> = split_secrets(utf8(path, bytes)?).collect();
        if words.is_empty() {
            return Err(format!("{} holds no secret", path.display()));
        }
        Ok(words)
    }

    /// Replaces the file as a secret volume does: a new file renamed over the old.
    fn replace(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    }

    #[test]
    fn a_change_replaces_the_value_and_a_broken_file_keeps_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "old").expect("write");
        let file = WatchedFile::load("TEST_FILE", &path, words).expect("loads");
        assert!(!file.reload_if_changed(), "unchanged");

        replace(&path, "old,new");
        assert!(file.reload_if_changed());
        assert_eq!(**file.current(), ["old", "new"]);

        // Same length and content shape: the rename alone is the change.
        replace(&path, "new,old");
        assert!(file.reload_if_changed());
        assert_eq!(**file.current(), ["new", "old"]);

        assert!(!file.stale());
        for broken in ["", " \n", ",\n,"] {
            replace(&path, broken);
            assert!(!file.reload_if_changed(), "{broken:?} is refused");
            assert_eq!(**file.current(), ["new", "old"]);
            assert!(file.stale(), "an older content is served");
        }
        std::fs::write(&path, [0xff, 0xfe]).expect("write");
        assert!(!file.reload_if_changed());
        std::fs::remove_file(&path).expect("remove");
        assert!(!file.reload_if_changed(), "a missing file keeps the value");
        assert!(!file.reload_if_changed(), "and is reported once");
        assert_eq!(**file.current(), ["new", "old"]);

        assert!(file.stale());
        replace(&path, "newest");
        assert!(file.reload_if_changed());
        assert_eq!(**file.current(), ["newest"]);
        assert!(!file.stale(), "the current content is served");

        // A file far larger than any secret is a wrong path: refused, not read whole.
        replace(&path, &"x".repeat(MAX_FILE_BYTES as usize + 1));
        assert!(!file.reload_if_changed());
        assert_eq!(**file.current(), ["newest"]);
        let refused = WatchedFile::load("TEST_FILE", &path, words).err();
        assert!(
            refused
                .as_deref()
                .is_some_and(|e| e.contains("larger than")),
            "{refused:?}"
        );
    }
}
