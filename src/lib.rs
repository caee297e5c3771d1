#![forbid(unsafe_code)]
pub mod core;
pub mod id;
pub mod sim;
pub mod wire;
pub use id::ObjectId;
pub use wire::is_udpferry_datagram;
