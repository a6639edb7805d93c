//! The gRPC surface: the generated proto types, conversion to the model, the service, status mapping.
//!
//! The only module that knows proto. It validates requests into the model and hands them to
//! `delivery`; it never builds channel JSON nor talks HTTP.

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("channelgateway.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("channelgateway_descriptor");
}

pub mod auth;
pub mod codec;
pub mod convert;
pub mod fetch;
pub mod limits;
pub mod receive;
pub mod service;
pub mod status;
pub mod watch;
