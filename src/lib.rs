#![forbid(unsafe_code)]
pub mod id;
pub mod wire;
pub use id::ObjectId;
pub use wire::is_udpferry_datagram;
