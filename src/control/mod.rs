//! The daemon's command socket: `STATE_DIR/control.sock`, mode 0600, one JSON request
//! line per connection and one JSON response line back.
//!
//! Clients find the socket from the mount point alone: the mount's source in
//! `/proc/self/mountinfo` is `fleecefs:STATE_DIR`.

pub mod client;
pub mod proto;
pub mod server;
