//! Untrusted input: a stream of frames (`vane_proto::api::frame`), any bytes: the body of a
//! restore (a snapshot's record, then its images) and the streamed answers of exec, logs
//! and snapshot, read with `frame::read`; a record frame is decoded as the controller
//! decodes it (`RestoreSpec`). Asserts: no panic; the frames read are, encoded again, the
//! bytes they were read from, in order; a clean end comes only at the end of the input; no
//! frame is longer than `frame::MAX_LEN`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vane_proto::api::{frame, RestoreSpec};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut read_back = Vec::new();
    loop {
        match frame::read(&mut rest) {
            Ok(Some((kind, body))) => {
                assert!(body.len() <= frame::MAX_LEN);
                if kind == frame::RECORD {
                    let _ = serde_json::from_slice::<RestoreSpec>(&body);
                }
                frame::encode(&mut read_back, kind, &body);
                assert_eq!(
                    read_back,
                    data[..read_back.len()],
                    "frames read are not the input"
                );
            }
            Ok(None) => {
                assert_eq!(
                    read_back.len(),
                    data.len(),
                    "a clean end before the input's"
                );
                break;
            }
            Err(_) => break,
        }
    }
});
