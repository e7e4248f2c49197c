//! The gRPC methods the sidecar serves, read from the services' own descriptors: what the
//! metrics label calls with, what the traces name their spans, and which calls the request
//! timeout may cut (a new streaming RPC can never be timed by mistake).

use prost::Message as _;

/// Every gRPC service any listener serves.
pub const SERVED_DESCRIPTOR_SETS: [&[u8]; 6] = [
    crate::proto::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    crate::flagd_proto::FILE_DESCRIPTOR_SET,
    crate::flagd_proto::sync::FILE_DESCRIPTOR_SET,
];

/// One method: its full service name, its name, and its streaming kind in go-grpc-prometheus's
/// words (`unary`, `server_stream`, `client_stream`, `bidi_stream`).
pub struct Method {
    pub service: String,
    pub name: String,
    pub kind: &'static str,
}

impl Method {
    /// The request path that calls it: `/package.Service/Method`.
    pub fn path(&self) -> String {
        format!("/{}/{}", self.service, self.name)
    }

    pub fn is_unary(&self) -> bool {
        self.kind == "unary"
    }
}

/// Every method of every service in the sets. A set that does not decode contributes nothing
/// (they are compiled in, so it never fails).
pub fn served_methods(descriptor_sets: &[&[u8]]) -> Vec<Method> {
    let mut methods = Vec::new();
    for set in descriptor_sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
            tracing::error!("a compiled-in file descriptor set does not decode");
            continue;
        };
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                let service_name = if package.is_empty() {
                    service.name().to_owned()
                } else {
                    format!("{package}.{}", service.name())
                };
                for method in &service.method {
                    let kind = match (method.client_streaming(), method.server_streaming()) {
                        (false, false) => "unary",
                        (false, true) => "server_stream",
                        (true, false) => "client_stream",
                        (true, true) => "bidi_stream",
                    };
                    methods.push(Method {
                        service: service_name.clone(),
                        name: method.name().to_owned(),
                        kind,
                    });
                }
            }
        }
    }
    methods
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_kinds_come_from_the_descriptors() {
        let methods = served_methods(&[crate::proto::FILE_DESCRIPTOR_SET]);
        let kind = |service: &str, method: &str| {
            methods
                .iter()
                .find(|m| m.service == service && m.name == method)
                .map(|m| m.kind)
        };
        assert_eq!(kind("coresdk.v1.FlagService", "GetFlag"), Some("unary"));
        assert_eq!(
            kind("coresdk.v1.FlagService", "WatchFlags"),
            Some("server_stream")
        );
        assert_eq!(kind("coresdk.v1.FlagService", "NoSuchMethod"), None);
    }
}
