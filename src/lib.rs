//! countersign: a human signature on every privileged action an AI agent or automation
//! pipeline wants to take. See ARCHITECTURE.md for the map.

pub mod api;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod config;
pub mod domain;
pub mod ledger;
pub mod listener;
pub mod notify;
pub mod policy;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod workflow;

/// An error and its causes on one line. tonic's and rustls's own messages ("transport
/// error") do not tell a person that the connection was refused or what the TLS library
/// rejected; a cause already contained in the text so far is not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

/// Code generated from `proto/countersign/v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("countersign.v1");

    /// The encoded descriptors of the API and its imports, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("countersign_descriptor");
}
