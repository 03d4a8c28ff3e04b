//! A deliberately broken plugin, for the host's fault tests: each path misbehaves in one way.

use batchbox_sdk::{Plugin, Request, Response, json};

struct Faults;

impl Plugin for Faults {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn handle(request: Request) -> Response {
        match request.path.rsplit('/').next().unwrap_or_default() {
            "panic" => panic!("this plugin panics on purpose"),
            "loop" => {
                // Spins without calling the host: only the CPU deadline can stop it.
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            _ => json(200, &"ok"),
        }
    }
}

batchbox_sdk::export_plugin!(Faults);
