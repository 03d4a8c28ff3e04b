//! What the HTTP-level tests share: the real `batchbox serve` binary on an ephemeral port,
//! with a config each test writes, and a small client.
#![allow(dead_code)] // each test binary uses its own part of this

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const PREDICT: &str = "/api/v1/predict/sentences";

/// The repository: `BATCHBOX_WORKSPACE` for a test binary run away from its build tree (the CUDA
/// tests on a GPU machine, see tools/gpu_check.sh), else the one it was built in.
pub fn workspace() -> &'static Path {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        std::env::var_os("BATCHBOX_WORKSPACE")
            .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned(), PathBuf::from)
    })
}

pub fn wasm(name: &str) -> PathBuf {
    let path = workspace().join("plugins/target/wasm32-wasip2/release").join(format!("{name}.wasm"));
    assert!(path.is_file(), "{} is missing: run `make plugins`", path.display());
    path
}

/// A Python plugin, built by `make plugins` with componentize-py.
pub fn python_wasm(name: &str) -> PathBuf {
    let path = workspace().join("plugins/target/python").join(format!("{name}.wasm"));
    assert!(path.is_file(), "{} is missing: run `make plugins`", path.display());
    path
}

/// A JavaScript plugin, built by `make plugins` with componentize-js.
pub fn js_wasm(name: &str) -> PathBuf {
    let path = workspace().join("plugins/target/js").join(format!("{name}.wasm"));
    assert!(path.is_file(), "{} is missing: run `make plugins`", path.display());
    path
}

pub fn fixture_sentences() -> Vec<String> {
    let text = std::fs::read_to_string(workspace().join("tests/fixtures/test_120_sentences.json")).unwrap();
    let value: Value = serde_json::from_str(&text).unwrap();
    value["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()
}

/// The `models:` and `api:` sections most tests share: the default model in fp32 (the same
/// precision on every machine), batches of up to 32 rows and 8192 tokens.
const MODEL_AND_API: &str = r#"models: [{ name: minilm-topics, path: "{model}", device: cpu, cpu_dtype: fp32 }]
api: { inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192 }"#;

/// Writes `yaml` to target/http-tests/<name>.yaml, after `{model_and_api}` ([`MODEL_AND_API`]),
/// `{model}` (the default model's directory), `{cache}` (a shared plugin cache), `{classifier}`
/// and `{hostile}` (the plugins).
pub fn write_config(name: &str, yaml: &str) -> PathBuf {
    let dir = workspace().join("target/http-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = yaml
        .replace("{model_and_api}", MODEL_AND_API)
        .replace("{model}", workspace().join("models/minilm-topics").to_str().unwrap())
        .replace("{cache}", dir.join("plugin-cache").to_str().unwrap())
        .replace("{classifier}", wasm("sentence_classifier").to_str().unwrap())
        .replace("{hostile}", wasm("hostile").to_str().unwrap());
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A running `batchbox serve`, killed on drop.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub agent: ureq::Agent,
}

impl Server {
    pub fn launch(config: &Path) -> Server {
        Self::launch_with_env(config, &[])
    }

    pub fn launch_with_env(config: &Path, env: &[(&str, &str)]) -> Server {
        Self::launch_with(config, |command| {
            command.envs(env.iter().copied());
        })
    }

    /// Launches the server with `customise` applied to its command (environment, stderr,
    /// resource limits).
    pub fn launch_with(config: &Path, customise: impl FnOnce(&mut Command)) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_batchbox"));
        command.args(["--config", config.to_str().unwrap(), "serve"]).env("RUST_LOG", "error").stdout(Stdio::piped());
        customise(&mut command);
        let mut child = command.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let base = line.trim().strip_prefix("listening on ").expect("the server prints its address").to_owned();
        let server = Server { child, base, agent: agent() };
        // Generous: `cpu_dtype: auto` measures every precision at startup (17.5 s for the default
        // model alone on 2 cores), and a test binary starts several servers at once.
        let deadline = Instant::now() + Duration::from_secs(300);
        while server.get("/ready").0 != 200 {
            assert!(Instant::now() < deadline, "the server did not become ready");
            assert!(server.child_alive(), "the server exited during startup");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn child_alive(&self) -> bool {
        // `try_wait` needs `&mut`; /proc tells without it.
        Path::new(&format!("/proc/{}", self.child.id())).exists()
    }

    pub fn address(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        read(self.agent.get(format!("{}{path}", self.base)).call().unwrap())
    }

    pub fn post(&self, path: &str, body: impl AsRef<[u8]>) -> (u16, Value) {
        self.post_with(path, body, &[])
    }

    /// The default tenant's predict route, which must answer 200.
    pub fn predict(&self, sentences: &[&str]) -> Value {
        let (status, body) = self.post(PREDICT, serde_json::json!({ "sentences": sentences }).to_string());
        assert_eq!(status, 200, "{body}");
        body
    }

    pub fn post_with(&self, path: &str, body: impl AsRef<[u8]>, headers: &[(&str, &str)]) -> (u16, Value) {
        read(self.send(path, body, headers))
    }

    pub fn send(
        &self,
        path: &str,
        body: impl AsRef<[u8]>,
        headers: &[(&str, &str)],
    ) -> ureq::http::Response<ureq::Body> {
        let mut request = self.agent.post(format!("{}{path}", self.base)).header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send(body.as_ref()).unwrap()
    }

    /// `n` posts of `body` to `path`, one at a time with `pause` before each, each answered 200:
    /// their latencies.
    pub fn timed_posts(&self, path: &str, body: &str, n: usize, pause: Duration) -> Vec<Duration> {
        (0..n)
            .map(|_| {
                std::thread::sleep(pause);
                let started = Instant::now();
                let (status, response) = self.post(path, body);
                assert_eq!(status, 200, "{response}");
                started.elapsed()
            })
            .collect()
    }

    /// Kills the server at once: a flood's queued requests would take long to finish, and
    /// clients still posting see their requests fail.
    pub fn kill_now(&self) {
        Command::new("kill").args(["-KILL", &self.child.id().to_string()]).status().unwrap();
    }

    /// The server's resident memory, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap()
            .trim()
            .trim_end_matches(" kB")
            .trim()
            .parse()
            .unwrap();
        kb * 1024
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn read(mut response: ureq::http::Response<ureq::Body>) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.body_mut().with_config().limit(64 << 20).read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text:?}")))
}

/// The `x-request-id` the server gave `response`.
pub fn request_id(response: &ureq::http::Response<ureq::Body>) -> u64 {
    response.headers()["x-request-id"].to_str().unwrap().parse().unwrap()
}

/// Two sentences whose topics the default model gets right: a well-behaved tenant's request.
pub fn predict_body() -> String {
    serde_json::json!({ "sentences": ["The striker scored twice.", "Parliament passed the budget."] }).to_string()
}

/// A well-behaved tenant's request on `PREDICT` (with `headers`, e.g. its key) is answered as
/// usual: what every attack by another tenant must leave working.
pub fn assert_served(server: &Server, headers: &[(&str, &str)], after: &str) {
    let (status, body) = server.post_with(PREDICT, predict_body(), headers);
    assert_eq!(status, 200, "served after {after}: {body}");
    assert_eq!(body["predictions"], serde_json::json!(["sports", "politics"]), "after {after}");
}

pub fn assert_json_error(status: u16, body: &Value, want_status: u16, want_code: &str, what: &str) {
    assert_eq!(status, want_status, "{what}: {body}");
    assert_eq!(body["error"]["code"], want_code, "{what}: {body}");
    assert!(!body["error"]["message"].as_str().unwrap_or_default().is_empty(), "{what}: {body}");
}

/// Sends `head` (request line and headers, without the blank line) and `body` over a raw
/// socket, for requests a client library would not send (two Host headers, absolute-form
/// targets), and reads the answer: its status and JSON body.
pub fn raw(server: &Server, head: &str, body: &str) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(server.address()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let request = format!("{head}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status =
        answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status line: {answer:?}"));
    let json = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(json).unwrap_or_else(|_| panic!("not JSON ({status}): {answer:?}")))
}

/// Runs the `batchbox` command to its end with `env` set (after `RUST_LOG=warn`, which `env` may
/// override): whether it succeeded, and its stdout and stderr together.
pub fn batchbox(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_batchbox"))
        .args(args)
        .env("RUST_LOG", "warn")
        // Log lines as text, as the tests that read them expect (the default is JSON off a terminal).
        .env("BATCHBOX_LOG_FORMAT", "text")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.success(),
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
    )
}

/// A client for the tests: statuses as answers, not errors, and a bound on every call.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// The `loadgen` binary, a package of its own: built beside `batchbox` by the workspace build
/// that `make test` runs first (cargo gives a test the paths of its own package's binaries only).
pub fn loadgen() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_batchbox")).with_file_name("loadgen");
    assert!(path.exists(), "{} is missing: `cargo build --release --workspace` builds it", path.display());
    path
}

/// The median of some durations.
pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}
