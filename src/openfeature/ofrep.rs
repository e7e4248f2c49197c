//! PLUMBING PLACEHOLDER: the OFREP slice replaces this file.

use crate::server::{ServeError, ServerTask, Side};

pub fn serve<C>(side: Side<C>) -> Result<ServerTask, ServeError> {
    let _ = side;
    Err(ServeError::Signals(std::io::Error::other(
        "OFREP is not built yet",
    )))
}
