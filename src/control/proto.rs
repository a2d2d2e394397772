//! Control protocol messages. Requests are strict: unknown operations or fields, wrong
//! types and oversized lines are refused with an error reply.

use serde::{Deserialize, Serialize};

/// Largest request line accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;

/// The line a client sends after reading the reply to a teardown with `ack`.
pub const ACK: &str = "{\"ack\":true}";

/// A request to the daemon.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Start a backup access.
    Setup {
        /// Target ID.
        target: String,
        /// Devices (all when absent).
        #[serde(default)]
        devices: Option<Vec<String>>,
        /// Bitmap name.
        #[serde(default)]
        bitmap: Option<String>,
    },
    /// End a backup access.
    Teardown {
        /// Target ID.
        target: String,
        /// Whether the backup succeeded.
        success: bool,
        /// The client acknowledges the reply: after reading the reply line it sends
        /// [`ACK`]. A success is applied to the bitmaps only once that arrives (without
        /// `ack`, once the reply is written). See docs/formats.md.
        #[serde(default)]
        ack: bool,
    },
    /// Report state.
    Status {},
    /// Delete the bitmaps of a target.
    BitmapRemove {
        /// Target ID.
        target: String,
    },
    /// Change a device's size. At most one of `size` and `grow_by`; neither: the
    /// source's size now.
    Resize {
        /// Device name.
        device: String,
        /// New size in bytes.
        #[serde(default)]
        size: Option<u64>,
        /// Bytes to add.
        #[serde(default)]
        grow_by: Option<u64>,
        /// Allow a smaller size.
        #[serde(default)]
        allow_shrink: bool,
    },
    /// Serve new devices: `[name, absolute path]` pairs.
    DeviceAdd {
        /// The devices.
        devices: Vec<(String, String)>,
        /// vhost-user-blk exports of them (absolute socket paths).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        vhost_user_blk: Vec<crate::vhost_user::ExportSpec>,
    },
    /// Stop serving a device.
    DeviceRemove {
        /// Device name.
        device: String,
    },
    /// Planned restart of the worker (`fleecefs restart`).
    Restart {
        /// Binary of the new worker (default: the keeper's).
        #[serde(default)]
        binary: Option<String>,
        /// Restart during an access (it breaks).
        #[serde(default)]
        force: bool,
    },
}

/// The reply to a request.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// One-line error message when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The result when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Response {
    /// A refusal with a one-line reason.
    pub fn failure(error: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(error.into()),
            data: None,
        }
    }
}

/// Parses one request line.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request is larger than {MAX_REQUEST} bytes"));
    }
    serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_and_refuses_bad_requests() {
        assert_eq!(parse_request(br#"{"op":"status"}"#), Ok(Request::Status {}));
        assert_eq!(
            parse_request(br#"{"op":"setup","target":"t"}"#),
            Ok(Request::Setup {
                target: "t".into(),
                devices: None,
                bitmap: None
            })
        );
        assert_eq!(
            parse_request(br#"{"op":"teardown","target":"t","success":false}"#),
            Ok(Request::Teardown {
                target: "t".into(),
                success: false,
                ack: false
            })
        );
        for bad in [
            &br#"{"op":"format_disk"}"#[..],
            br#"{"op":"setup"}"#,
            br#"{"op":"setup","target":5}"#,
            br#"{"op":"teardown","target":"t","success":"yes"}"#,
            br#"{"op":"status","extra":1}"#,
            br#"{"op":"setup","target":"t","devices":"a"}"#,
            b"not json",
            b"",
            b"[]",
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let huge = vec![b' '; MAX_REQUEST + 1];
        assert!(parse_request(&huge).unwrap_err().contains("larger"));
    }
}
