//! Hot reload of the config file (`POST /admin/reload`, SIGHUP) on the real server binary.
//!
//! The claim under load: 16 clients send requests without pause for 20 s while the config is
//! reloaded 10 times (a tenant added, one removed, a plugin file swapped, keys rotated, limits
//! changed, one broken config), and no request fails other than those the key rotation must
//! refuse; every answer is one that a config current at some moment of the request would give.
//!
//! Alone in its test binary: it loads the 2-core machine with 16 clients.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, assert_json_error, read, wasm, workspace, write_config};
use serde_json::{Value, json};

const ADMIN_KEY: &str = "admin-key-for-tests";

/// A directory of its own for each test's config, keys and plugin copies.
fn dir(name: &str) -> PathBuf {
    let dir = workspace().join("target/http-tests").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const ADMIN: (&str, &str) = ("authorization", "Bearer admin-key-for-tests");

/// The `server:` section of these tests: admin keys from `admin.keys` beside the config, and idle
/// connections kept for a minute, so that no client meets a keep-alive connection closing just as
/// it sends (a race of HTTP/1.1 itself, not of reloads).
const SERVER: &str = r#"server: { bind: "127.0.0.1:0", plugin_cache_dir: "{cache}", admin_keys: ["file:admin.keys"], keep_alive_idle_ms: 60000, header_read_timeout_ms: 60000 }"#;

/// `POST /admin/reload` with the admin key: its status and body.
fn reload(server: &Server) -> (u16, Value) {
    server.post_with("/admin/reload", "", &[ADMIN])
}

/// `GET path` with `headers`.
fn get_with(server: &Server, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = server.agent.get(format!("{}{path}", server.base));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    read(request.call().unwrap())
}

fn admin_config(server: &Server) -> Value {
    let (status, body) = get_with(server, "/admin/config", &[ADMIN]);
    assert_eq!(status, 200, "{body}");
    body
}

/// Which plugin `/swap` runs: the file at its path is replaced by the one or the other.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Swap {
    Echo,
    Classifier,
}

impl Swap {
    fn wasm(self) -> PathBuf {
        match self {
            Swap::Echo => wasm("plugin_echo"),
            Swap::Classifier => wasm("sentence_classifier"),
        }
    }

    /// Which plugin answered, from its answer: the echo's has the request's method.
    fn of(answer: &Value) -> Option<Swap> {
        match (answer.get("method"), answer.get("predictions")) {
            (Some(_), None) => Some(Swap::Echo),
            (None, Some(_)) => Some(Swap::Classifier),
            _ => None,
        }
    }
}

/// One config the load test runs under.
#[derive(Clone, Debug)]
struct Spec {
    swap: Swap,
    /// The index of the one key `/keyed` takes.
    key: usize,
    /// Whether `/added` and `/removed` are served.
    added: bool,
    removed_present: bool,
    /// `/steady`'s `max_body_bytes` (changed once: a limit reloaded).
    steady_body: usize,
}

fn key(index: usize) -> String {
    format!("keyed-key-{index}")
}

/// Writes `spec`'s config (and its key file and plugin file) into `dir`; `broken` adds a tenant
/// whose plugin is not WebAssembly.
fn write_spec(dir: &Path, spec: &Spec, broken: bool) -> PathBuf {
    std::fs::write(dir.join("admin.keys"), format!("{ADMIN_KEY}\n")).unwrap();
    std::fs::write(dir.join("keyed.keys"), format!("{}\n", key(spec.key))).unwrap();
    // Written beside, then renamed: the server never reads half a plugin.
    std::fs::copy(spec.swap.wasm(), dir.join("swap.wasm.partial")).unwrap();
    std::fs::rename(dir.join("swap.wasm.partial"), dir.join("swap.wasm")).unwrap();
    std::fs::write(dir.join("broken.wasm"), b"not a WebAssembly component").unwrap();
    let mut tenants = vec![
        format!(
            "{{ name: steady, wasm: \"{{classifier}}\", routes: [/steady], limits: {{ max_body_bytes: {} }} }}",
            spec.steady_body
        ),
        "{ name: swap, wasm: swap.wasm, routes: [/swap] }".to_owned(),
        "{ name: keyed, wasm: \"{classifier}\", routes: [/keyed], keys: [\"file:keyed.keys\"] }".to_owned(),
    ];
    if spec.added {
        tenants.push("{ name: added, wasm: \"{classifier}\", routes: [/added] }".into());
    }
    if spec.removed_present {
        tenants.push("{ name: removed, wasm: \"{classifier}\", routes: [/removed] }".into());
    }
    if broken {
        tenants.push("{ name: broken, wasm: broken.wasm, routes: [/broken] }".into());
    }
    let yaml = format!(
        "{{model_and_api}}\n{SERVER}\ntenants:\n{}\n",
        tenants.iter().map(|t| format!("  - {t}")).collect::<Vec<_>>().join("\n")
    );
    let path = write_config(&format!("{}/config", dir.file_name().unwrap().to_str().unwrap()), &yaml);
    // The config's relative paths are taken from its own directory.
    assert_eq!(path.parent().unwrap(), dir);
    path
}

/// What a client asked for.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Steady,
    Swap,
    Keyed { key: usize },
    Added,
    Removed,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Steady => "/steady",
            Kind::Swap => "/swap",
            Kind::Keyed { .. } => "/keyed",
            Kind::Added => "/added",
            Kind::Removed => "/removed",
        }
    }

    /// Whether `spec` answers this request with `status` and `answer`.
    fn fits(self, spec: &Spec, status: u16, answer: &Value) -> bool {
        let served =
            |present: bool| if present { status == 200 && answer["predictions"].is_array() } else { status == 404 };
        match self {
            Kind::Steady => served(true),
            Kind::Swap => status == 200 && Swap::of(answer) == Some(spec.swap),
            Kind::Keyed { key } => {
                if key == spec.key {
                    served(true)
                } else {
                    status == 401
                }
            }
            Kind::Added => served(spec.added),
            Kind::Removed => served(spec.removed_present),
        }
    }
}

/// One request a client sent, and what came back.
struct Sent {
    kind: Kind,
    started: Instant,
    ended: Instant,
    status: u16,
    answer: Value,
}

/// Each config that served, and from when to when it may have been current: from the start of
/// the reload that made it to the end of the reload that replaced it.
struct Timeline {
    configs: Vec<(Spec, Instant, Option<Instant>)>,
}

impl Timeline {
    /// The configs that may have been current at some moment of `[started, ended]`.
    fn during(&self, started: Instant, ended: Instant) -> impl Iterator<Item = &Spec> {
        self.configs
            .iter()
            .filter(move |(_, from, to)| *from <= ended && to.is_none_or(|to| to >= started))
            .map(|(spec, _, _)| spec)
    }
}

#[test]
fn sixteen_clients_lose_no_request_across_ten_reloads_and_every_answer_fits_a_config_of_its_time() {
    const CLIENTS: usize = 16;
    const RUN: Duration = Duration::from_secs(20);
    let dir = dir("reload-load");
    let first = Spec { swap: Swap::Echo, key: 0, added: false, removed_present: true, steady_body: 2 << 20 };
    let config = write_spec(&dir, &first, false);
    let server = Server::launch(&config);
    let current_key = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();

    // The reloads, two seconds apart: what each changes (`None`: a broken config).
    let steps: [Option<fn(&mut Spec)>; 10] = [
        Some(|s| s.swap = Swap::Classifier),
        Some(|s| s.added = true),
        Some(|s| s.key = 1),
        None,
        Some(|s| s.removed_present = false),
        Some(|s| s.swap = Swap::Echo),
        Some(|s| s.key = 2),
        Some(|s| s.steady_body = 1 << 20),
        Some(|s| s.swap = Swap::Classifier),
        Some(|_| {}),
    ];

    let sent = Arc::new(Mutex::new(Vec::<Sent>::new()));
    let timeline = std::thread::scope(|scope| {
        for client in 0..CLIENTS {
            let (server, sent, current_key) = (&server, sent.clone(), current_key.clone());
            scope.spawn(move || {
                let body = json!({ "sentences": ["The striker scored twice."] }).to_string();
                let mut i = client;
                while started.elapsed() < RUN {
                    let kind = match i % 5 {
                        0 => Kind::Steady,
                        1 => Kind::Swap,
                        2 => Kind::Keyed { key: current_key.load(Ordering::SeqCst) },
                        3 => Kind::Added,
                        _ => Kind::Removed,
                    };
                    i += 1;
                    let bearer = match kind {
                        Kind::Keyed { key: k } => format!("Bearer {}", key(k)),
                        _ => String::new(),
                    };
                    let headers: &[(&str, &str)] = if bearer.is_empty() { &[] } else { &[("authorization", &bearer)] };
                    let request_started = Instant::now();
                    let mut request = server.agent.post(format!("{}{}", server.base, kind.path()));
                    for (name, value) in headers {
                        request = request.header(*name, *value);
                    }
                    // A failure to get any answer is recorded too, as status 0: it fits no config.
                    let (status, answer) = match request.send(&body) {
                        Ok(response) => read(response),
                        Err(e) => (0, json!(e.to_string())),
                    };
                    let ended = Instant::now();
                    sent.lock().unwrap().push(Sent { kind, started: request_started, ended, status, answer });
                }
            });
        }

        let mut spec = first.clone();
        let mut configs = vec![(first.clone(), started, None)];
        let mut version = admin_config(&server)["version"].as_u64().unwrap();
        for (i, step) in steps.iter().enumerate() {
            std::thread::sleep(RUN / 11);
            let mut next = spec.clone();
            if let Some(change) = step {
                change(&mut next);
            }
            let valid = step.is_some();
            write_spec(&dir, if valid { &next } else { &spec }, !valid);
            let before = admin_config(&server);
            let reload_started = Instant::now();
            let (status, body) = reload(&server);
            let reload_ended = Instant::now();
            if !valid {
                assert_json_error(status, &body, 422, "reload_refused", "a plugin that is not WebAssembly");
                assert!(body["error"]["message"].as_str().unwrap().contains("tenant broken"), "{body}");
                let after = admin_config(&server);
                assert_eq!((&after["version"], &after["hash"]), (&before["version"], &before["hash"]), "unchanged");
                assert!(after["last_refused_reload"]["error"].as_str().unwrap().contains("broken"), "{after}");
                // The config file is put back as it runs, for the next steps to build on.
                write_spec(&dir, &spec, false);
                continue;
            }
            assert_eq!(status, 200, "reload {i}: {body}");
            version += 1;
            assert_eq!(body["config"]["version"], version, "{body}");
            configs.last_mut().unwrap().2 = Some(reload_ended);
            configs.push((next.clone(), reload_started, None));
            if next.key != spec.key {
                // Right after the swap: the old key is refused, the new one served.
                let old = format!("Bearer {}", key(spec.key));
                let new = format!("Bearer {}", key(next.key));
                let body = json!({ "sentences": ["hi"] }).to_string();
                assert_eq!(server.post_with("/keyed", &body, &[("authorization", &old)]).0, 401);
                assert_eq!(server.post_with("/keyed", &body, &[("authorization", &new)]).0, 200);
                current_key.store(next.key, Ordering::SeqCst);
            }
            if next.swap != spec.swap {
                let shown = &body["config"]["tenants"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|t| t["name"] == "swap")
                    .unwrap()["plugin_sha256"];
                assert_ne!(shown, &before["tenants"][1]["plugin_sha256"], "the new plugin's hash is shown");
            }
            spec = next;
        }
        Timeline { configs }
    });

    let sent = sent.lock().unwrap();
    let mut unexpected = Vec::new();
    let mut refused_by_rotation = 0;
    for request in sent.iter() {
        let fits = timeline
            .during(request.started, request.ended)
            .any(|spec| request.kind.fits(spec, request.status, &request.answer));
        if !fits {
            unexpected.push(format!("{:?} answered {} {}", request.kind, request.status, request.answer));
        } else if request.status == 401 {
            refused_by_rotation += 1;
        }
    }
    eprintln!(
        "{} requests in {:?}, {} configs, {refused_by_rotation} refused by key rotation",
        sent.len(),
        RUN,
        timeline.configs.len()
    );
    assert!(
        unexpected.is_empty(),
        "{} unexpected answers, e.g. {:?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)]
    );
    assert_eq!(timeline.configs.len(), 10, "nine reloads took, the broken one did not");
    assert!(sent.len() > 1000, "the clients kept the server busy: {} requests", sent.len());
    for path in ["/steady", "/swap", "/keyed", "/added", "/removed"] {
        let seen = sent.iter().filter(|r| r.kind.path() == path).count();
        assert!(seen > 50, "{path}: only {seen} requests");
    }
}

/// The server's threads of model `name`: its model thread, and those libtorch started from it,
/// which inherit its name (`model-<name>`, cut to the kernel's 15 bytes).
fn model_threads(server: &Server, name: &str) -> usize {
    let comm: String = format!("model-{name}").chars().take(15).collect();
    let tasks = std::fs::read_dir(format!("/proc/{}/task", server.child.id())).unwrap();
    // A thread may end between listing and reading: it no longer counts.
    let named =
        |task: &std::fs::DirEntry| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim() == comm);
    tasks.filter_map(Result::ok).filter(named).count()
}

/// The config of the model-removal test: `minilm-topics` serving `/steady`, and, if `second`,
/// the same model loaded again as `second` serving `/second`.
fn two_models(second: bool) -> PathBuf {
    let dir = dir("reload-models");
    std::fs::write(dir.join("admin.keys"), "admin-key-for-tests\n").unwrap();
    let (model, tenant) = if second {
        (
            ", { name: second, path: \"{model}\", device: cpu, cpu_dtype: fp32 }",
            "\n  - { name: second, wasm: \"{classifier}\", routes: [/second], model: second, limits: { wall_ms: 120000 } }",
        )
    } else {
        ("", "")
    };
    write_config(
        "reload-models/config",
        &format!(
            r#"models: [{{ name: minilm-topics, path: "{{model}}", device: cpu, cpu_dtype: fp32 }}{model}]
api: {{ inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192 }}
{SERVER}
tenants:
  - {{ name: steady, wasm: "{{classifier}}", routes: [/steady] }}{tenant}
"#
        ),
    )
}

#[test]
fn a_model_removed_while_its_queue_holds_work_answers_every_queued_request_and_stops() {
    let server = Server::launch(&two_models(true));
    assert!(model_threads(&server, "second") > 0);
    let sentences = common::fixture_sentences();
    let heavy = json!({ "sentences": sentences }).to_string();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let reload_id = Mutex::new(None::<u64>);
    let answers = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..6)
            .map(|_| {
                scope.spawn(|| {
                    let mut answers = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let response = server.send("/second", &heavy, &[]);
                        let id = common::request_id(&response);
                        let (status, body) = common::read(response);
                        answers.push((id, status, body));
                    }
                    answers
                })
            })
            .collect();
        // Reload once the second model's queue holds work.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, models) = server.get("/v1/models");
            let second = models["models"].as_array().unwrap().iter().find(|m| m["name"] == "second").cloned();
            if second.is_some_and(|m| m["stats"]["queued_sequences"].as_u64() > Some(0)) {
                break;
            }
            assert!(Instant::now() < deadline, "the second model's queue never held work");
            std::thread::sleep(Duration::from_millis(5));
        }
        two_models(false);
        let response = server.send("/admin/reload", "", &[ADMIN]);
        *reload_id.lock().unwrap() = Some(common::request_id(&response));
        let (status, body) = common::read(response);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["config"]["changes"], json!(["model second removed", "tenant second removed"]));
        // New requests find the tenant gone; those queued before the swap are still answered.
        let (status, body) = server.post("/second", &heavy);
        assert_json_error(status, &body, 404, "not_found", "a request after the removal");
        stop.store(true, Ordering::SeqCst);
        clients.into_iter().flat_map(|c| c.join().unwrap()).collect::<Vec<_>>()
    });
    // Request ids order the generations: a request numbered below the reload ran on the config
    // from before it (the server takes the config, then the id), so it never found the tenant gone.
    let reload_id = reload_id.into_inner().unwrap().unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for (id, status, body) in &answers {
        match status {
            200 => assert_eq!(body["predictions"].as_array().map(Vec::len), Some(sentences.len()), "{body}"),
            404 => assert!(*id > reload_id, "404 only for requests after the reload (#{reload_id}): #{id} {body}"),
            503 => assert!(body["error"]["code"].is_string(), "a clear 503: {body}"),
            _ => panic!("unexpected answer {status}: {body}"),
        }
        *counts.entry(status).or_insert(0) += 1;
    }
    eprintln!("answers by status: {counts:?}");
    assert!(counts.get(&200).is_some_and(|&n| n >= 6), "every client's queued request was answered: {counts:?}");
    // Once the old config's requests are done, the removed model's thread stops.
    let deadline = Instant::now() + Duration::from_secs(30);
    while model_threads(&server, "second") != 0 {
        assert!(Instant::now() < deadline, "the removed model's thread still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ready = server.get("/ready").1;
    assert_eq!(ready["models"].as_object().unwrap().keys().collect::<Vec<_>>(), ["minilm-topics"], "{ready}");

    // Adding it back loads it, and serves it once the swap is done.
    two_models(true);
    let (status, body) = reload(&server);
    assert_eq!(status, 200, "{body}");
    assert!(model_threads(&server, "second") > 0);
    let (status, body) = server.post("/second", json!({ "sentences": ["The striker scored twice."] }).to_string());
    assert_eq!((status, &body["predictions"]), (200, &json!(["sports"])), "{body}");
}

#[test]
fn admin_routes_need_admin_keys_and_refused_reloads_say_why_and_change_nothing() {
    // No admin keys: the admin routes are not there.
    let open = write_config(
        "reload-no-admin",
        "{model_and_api}\nserver: { bind: \"127.0.0.1:0\", plugin_cache_dir: \"{cache}\" }\ntenants:\n  - { name: a, wasm: \"{classifier}\", routes: [/a] }\n",
    );
    let server = Server::launch(&open);
    let (status, body) = server.post("/admin/reload", "");
    assert_json_error(status, &body, 404, "not_found", "admin off");
    let (status, body) = server.get("/admin/config");
    assert_json_error(status, &body, 404, "not_found", "admin off");
    drop(server);

    let dir = dir("reload-admin");
    std::fs::write(dir.join("admin.keys"), "admin-key-for-tests\n").unwrap();
    std::fs::write(dir.join("a.keys"), "tenant-a-key\n").unwrap();
    let good = format!(
        "{{model_and_api}}\n{SERVER}\ntenants:\n  - {{ name: a, wasm: \"{{classifier}}\", routes: [/a], keys: [\"file:a.keys\"] }}\n"
    );
    let good = good.as_str();
    let config = write_config("reload-admin/config", good);
    let server = Server::launch(&config);
    for (headers, what) in [(&[][..], "no key"), (&[("authorization", "Bearer tenant-a-key")][..], "a tenant's key")] {
        let (status, body) = server.post_with("/admin/reload", "", headers);
        assert_json_error(status, &body, 401, "unauthorized", what);
        let (status, body) = get_with(&server, "/admin/config", headers);
        assert_json_error(status, &body, 401, "unauthorized", what);
    }
    let (status, body) = get_with(&server, "/admin/reload", &[ADMIN]);
    assert_json_error(status, &body, 405, "method_not_allowed", "GET /admin/reload");

    // What /admin/config shows: never a key, nor a key's hash.
    let about = admin_config(&server);
    assert_eq!(about["version"], 1);
    assert_eq!(about["trigger"], "startup");
    assert_eq!(about["tenants"][0]["keys"], 1);
    let text = about.to_string();
    for secret in
        ["tenant-a-key", "admin-key-for-tests", &hex_sha256("tenant-a-key"), &hex_sha256("admin-key-for-tests")]
    {
        assert!(!text.contains(secret), "/admin/config shows {secret}");
    }

    // Refused: each leaves the running config as it was, and says why.
    let refusals = [
        ("tenants: [oops", "invalid config"),
        (&*good.replace("127.0.0.1:0", "127.0.0.1:1"), "server.bind"),
        (&*good.replace("keep_alive_idle_ms: 60000", "keep_alive_idle_ms: 1000"), "server.keep_alive_idle_ms"),
        (
            &*good.replace(
                "{model_and_api}",
                "models: [{ name: minilm-topics, path: \"{model}\", device: cpu, cpu_dtype: fp32 }]\n\
                 api: { inference_batch_size: 16, use_fp16: true, max_batch_tokens: 8192 }",
            ),
            "api.inference_batch_size",
        ),
        (&*good.replace("routes: [/a]", "routes: [/a], config: { labels_from: 7 }"), "tenant a"),
    ];
    for (yaml, why) in refusals {
        write_config("reload-admin/config", yaml);
        let (status, body) = reload(&server);
        assert_json_error(status, &body, 422, "reload_refused", why);
        assert!(body["error"]["message"].as_str().unwrap().contains(why), "{why}: {body}");
        let now = admin_config(&server);
        assert_eq!((&now["version"], &now["hash"]), (&about["version"], &about["hash"]), "{why}");
        assert_eq!(server.post_with("/a", common::predict_body(), &[("authorization", "Bearer tenant-a-key")]).0, 200);
    }

    // SIGHUP reloads too, and logs (here: records) what it did.
    write_config("reload-admin/config", good);
    std::fs::write(dir.join("a.keys"), "tenant-a-key-2\n").unwrap();
    std::process::Command::new("kill").args(["-HUP", &server.child.id().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin_config(&server)["version"] != 2 {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(20));
    }
    let now = admin_config(&server);
    assert_eq!((&now["trigger"], &now["changes"]), (&json!("SIGHUP"), &json!(["tenant a: keys"])), "{now}");
    assert_ne!(now["hash"], about["hash"], "new keys, new hash");
    assert_eq!(now["last_refused_reload"]["trigger"], "POST /admin/reload");
    assert_eq!(server.post_with("/a", common::predict_body(), &[("authorization", "Bearer tenant-a-key")]).0, 401);
    assert_eq!(server.post_with("/a", common::predict_body(), &[("authorization", "Bearer tenant-a-key-2")]).0, 200);
}

fn hex_sha256(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}
