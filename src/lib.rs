//! countersign: a human signature on every privileged action an AI agent or automation
//! pipeline wants to take. See ARCHITECTURE.md for the map.

pub mod api;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod config;
pub mod domain;
pub mod ledger;
pub mod notify;
pub mod policy;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod workflow;

/// Code generated from `proto/countersign/v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("countersign.v1");

    /// The encoded descriptors of the API and its imports, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("countersign_descriptor");
}
