//! KServe's Open Inference Protocol (v2), the REST API that Triton, KServe and Seldon speak and
//! `tritonclient.http` calls, for the tenant's text classifier. Paths are below the tenant's route
//! (`InferenceServerClient(url="host:port/<route>")`):
//!
//! - `GET v2`: server metadata, with the extensions it supports (`classification`,
//!   `binary_tensor_data`);
//! - `GET v2/health/live`, `GET v2/health/ready`: 200 while the plugin answers (the host's
//!   `/ready` decides whether requests reach it at all);
//! - `GET v2/models/{model}[/versions/{v}]`: the model's metadata; `.../ready`: 200;
//! - `POST v2/models/{model}[/versions/{v}]/infer`: one input, `TEXT` (`BYTES`, shape `[n]` or
//!   `[n, 1]`), and the outputs `SCORES` (`FP32` `[n, labels]`: the model's scores, softmax or
//!   sigmoid as its checkpoint says) and `LOGITS` (`FP32` `[n, labels]`, raw); all outputs when
//!   the request names none.
//!
//! Extensions:
//! - **binary tensor data**: a body whose first `Inference-Header-Content-Length` bytes are the JSON
//!   header, followed by each input's bytes (`parameters.binary_data_size`) in order; a `BYTES`
//!   element is a 4-byte little-endian length and its bytes. An output asked for with
//!   `parameters.binary_data: true` (or every output, with the request's `binary_data_output`)
//!   comes back the same way, with the header's length in `Inference-Header-Content-Length`.
//!   Sizes that do not add up to the body are refused (400).
//! - **classification**: `parameters.classification: k` on an output turns each row into its top
//!   `k` classes as `BYTES` `"<score>:<index>:<label>"`, highest first.
//!
//! `{model}` is the served model's name (`GET /v1/models`); another is 404. Errors are the
//! protocol's `{"error": "..."}`, with the status, and name what was wrong.

use batchbox_sdk::scores::{apply, ranked};
use batchbox_sdk::{Describe, Plugin, Request, Response, Settings, Task, check_count, host};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The plugin's own `config` in shared_config.yaml.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    /// More texts than this in one request: 413.
    max_inputs: usize,
    /// A text longer than this many bytes: 413.
    max_input_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self { max_inputs: 1000, max_input_bytes: 40_000 }
    }
}

static SETTINGS: Settings<Config> = Settings::new();

const INPUT: &str = "TEXT";
const OUTPUTS: [&str; 2] = ["SCORES", "LOGITS"];

struct KServe;

impl Plugin for KServe {
    fn configure(config: String) -> Result<(), String> {
        SETTINGS.configure(&config, Task::SequenceClassification)
    }

    fn handle(request: Request) -> Response {
        route(&request).unwrap_or_else(|response| response)
    }
}

fn reply(status: u16, body: &Value) -> Response {
    let body = serde_json::to_vec(body).unwrap_or_default();
    Response { status, headers: vec![("content-type".into(), "application/json".into())], body }
}

/// The protocol's error shape.
fn fail(status: u16, message: impl std::fmt::Display) -> Response {
    reply(status, &json!({ "error": message.to_string() }))
}

fn bad(message: impl std::fmt::Display) -> Response {
    fail(400, message)
}

/// The path from `v2` on: the tenant's route is in front of it.
fn route(request: &Request) -> Result<Response, Response> {
    let path = request.path.trim_end_matches('/');
    let Some(at) = path.find("/v2").filter(|&at| path[at..] == *"/v2" || path[at..].starts_with("/v2/")) else {
        return Err(fail(404, format!("{path}: this route answers the Open Inference Protocol under <route>/v2")));
    };
    let parts: Vec<&str> = path[at + 1..].split('/').collect();
    let get = request.method == "GET";
    let model = host::model();
    match parts.as_slice() {
        ["v2"] if get => Ok(reply(
            200,
            &json!({
                "name": "batchbox",
                "version": env!("CARGO_PKG_VERSION"),
                "extensions": ["classification", "binary_tensor_data"],
            }),
        )),
        ["v2", "health", "live" | "ready"] if get => Ok(reply(200, &json!({}))),
        ["v2", "models", name, rest @ ..] => {
            if *name != model.name {
                return Err(fail(404, format!("unknown model `{name}`; this route serves `{}`", model.name)));
            }
            let rest = match rest {
                ["versions", version, rest @ ..] if *version == "1" => rest,
                ["versions", version, ..] => {
                    return Err(fail(404, format!("unknown version `{version}` of `{name}`; it has version 1")));
                }
                rest => rest,
            };
            match (rest, get) {
                ([], true) => Ok(reply(200, &metadata(&model))),
                (["ready"], true) => Ok(reply(200, &json!({}))),
                (["infer"], false) if request.method == "POST" => infer(request, &model),
                _ => Err(fail(405, format!("{} {path} is not part of the protocol", request.method))),
            }
        }
        _ => Err(fail(404, format!("{} {path} is not part of the protocol", request.method))),
    }
}

fn metadata(model: &batchbox_sdk::ModelInfo) -> Value {
    let labels = model.labels.len();
    json!({
        "name": model.name,
        "versions": ["1"],
        "platform": "batchbox",
        "inputs": [{ "name": INPUT, "datatype": "BYTES", "shape": [-1] }],
        "outputs": OUTPUTS.map(|name| json!({ "name": name, "datatype": "FP32", "shape": [-1, labels] })),
        "parameters": { "labels": model.labels, "max_length": model.max_length },
    })
}

/// One output the request asks for.
struct Wanted {
    name: String,
    binary: bool,
    /// `classification: k`.
    classes: Option<usize>,
}

fn infer(request: &Request, model: &batchbox_sdk::ModelInfo) -> Result<Response, Response> {
    let config = SETTINGS.get().map_err(|_| fail(500, "plugin not configured"))?;
    let header_length = match request.headers.iter().find(|(name, _)| name == "inference-header-content-length") {
        None => request.body.len(),
        Some((_, value)) => match value.trim().parse::<usize>() {
            Ok(n) if n <= request.body.len() => n,
            _ => {
                return Err(bad(format!(
                    "Inference-Header-Content-Length {value:?} is not a length within the body's {} bytes",
                    request.body.len()
                )));
            }
        },
    };
    let (header, mut binary) = request.body.split_at(header_length);
    let header: Map<String, Value> = match serde_json::from_slice(header) {
        Ok(Value::Object(header)) => header,
        Ok(_) => return Err(bad("the inference request must be a JSON object")),
        Err(e) => return Err(bad(format!("the inference request is not JSON: {e}"))),
    };
    let id = header.get("id").cloned();
    let parameters = header.get("parameters").and_then(Value::as_object);
    let binary_output = parameters.and_then(|p| p.get("binary_data_output")).and_then(Value::as_bool).unwrap_or(false);

    let inputs = header.get("inputs").and_then(Value::as_array).ok_or_else(|| bad("missing `inputs`"))?;
    let [input] = inputs.as_slice() else {
        return Err(bad(format!("expected one input, `{INPUT}`; got {}", inputs.len())));
    };
    let texts = texts(input, &mut binary, config)?;
    if !binary.is_empty() {
        return Err(bad(format!(
            "the body has {} bytes after the inputs' binary data; binary_data_size and Inference-Header-Content-Length \
             do not add up",
            binary.len()
        )));
    }
    let wanted = outputs(header.get("outputs"), binary_output, model.labels.len())?;

    let computed = host::infer_texts(&texts).map_err(|e| {
        let response = e.into_response();
        let message = serde_json::from_slice::<Value>(&response.body)
            .ok()
            .and_then(|body| body["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let mut answer = fail(response.status, message);
        answer.headers.extend(response.headers.into_iter().filter(|(name, _)| name != "content-type"));
        answer
    })?;
    let activation = host::model_scoring().activation;
    let logits: Vec<&[f32]> = computed.inference.outputs.iter().map(|t| t.data.as_slice()).collect();
    let scores: Vec<Vec<f32>> = logits.iter().map(|row| apply(activation, row)).collect();

    let (mut described, mut data) = (Vec::new(), Vec::new());
    for want in &wanted {
        let rows: Vec<&[f32]> = match want.name.as_str() {
            "SCORES" => scores.iter().map(Vec::as_slice).collect(),
            _ => logits.clone(),
        };
        let mut output = Map::new();
        output.insert("name".into(), json!(want.name));
        let tensor = match want.classes {
            Some(k) => Tensor::Classes(rows.iter().map(|row| top_classes(row, k, &model.labels)).collect()),
            None => Tensor::Fp32(rows),
        };
        output.insert("datatype".into(), json!(tensor.datatype()));
        output.insert("shape".into(), json!([texts.len(), tensor.width(model.labels.len())]));
        if want.binary {
            let bytes = tensor.bytes();
            output.insert("parameters".into(), json!({ "binary_data_size": bytes.len() }));
            data.extend(bytes);
        } else {
            output.insert("data".into(), tensor.json());
        }
        described.push(Value::Object(output));
    }
    let mut answer = Map::new();
    answer.insert("model_name".into(), json!(model.name));
    answer.insert("model_version".into(), json!("1"));
    if let Some(id) = id {
        answer.insert("id".into(), id);
    }
    answer.insert("outputs".into(), Value::Array(described));
    let mut response = reply(200, &Value::Object(answer));
    if !data.is_empty() {
        let header_length = response.body.len();
        response.body.extend(data);
        response.headers = vec![
            ("content-type".into(), "application/octet-stream".into()),
            ("inference-header-content-length".into(), header_length.to_string()),
        ];
    }
    Ok(response)
}

/// The texts of the `TEXT` input, from its JSON `data` or from the binary data after the header.
fn texts(input: &Value, binary: &mut &[u8], config: &Config) -> Result<Vec<String>, Response> {
    let name = input["name"].as_str().unwrap_or_default();
    if name != INPUT {
        return Err(bad(format!("unknown input `{name}`; the model takes `{INPUT}` (BYTES)")));
    }
    if input["datatype"] != "BYTES" {
        return Err(bad(format!("input `{INPUT}` must be BYTES, not {}", input["datatype"])));
    }
    let shape: Vec<u64> = input["shape"]
        .as_array()
        .map(|dims| dims.iter().filter_map(Value::as_u64).collect())
        .filter(|dims: &Vec<u64>| dims.len() == input["shape"].as_array().map_or(0, Vec::len))
        .ok_or_else(|| bad(format!("input `{INPUT}` needs a `shape` of non-negative integers")))?;
    let count = match shape.as_slice() {
        [n] | [n, 1] => *n as usize,
        other => return Err(bad(format!("input `{INPUT}` has shape {other:?}; expected [n] or [n, 1]"))),
    };
    check_count(count, "input", config.max_inputs)
        .map_err(|_| fail(413, format!("{count} texts; the limit is {}", config.max_inputs)))?;
    let binary_size = input.get("parameters").and_then(|p| p.get("binary_data_size"));
    let texts: Vec<String> = match binary_size {
        Some(size) => {
            let size = size.as_u64().ok_or_else(|| bad("`binary_data_size` must be a non-negative integer"))? as usize;
            if size > binary.len() {
                return Err(bad(format!(
                    "input `{INPUT}` has binary_data_size {size} but only {} bytes follow the header",
                    binary.len()
                )));
            }
            let (mine, rest) = binary.split_at(size);
            *binary = rest;
            byte_elements(mine)?
        }
        None => {
            let mut flat = Vec::new();
            flatten(&input["data"], &mut flat)?;
            flat
        }
    };
    if texts.len() != count {
        return Err(bad(format!("input `{INPUT}` has {} elements but its shape says {count}", texts.len())));
    }
    for (i, text) in texts.iter().enumerate() {
        if text.trim().is_empty() {
            return Err(bad(format!("input `{INPUT}` element {i} is empty")));
        }
        if text.len() > config.max_input_bytes {
            return Err(fail(
                413,
                format!(
                    "input `{INPUT}` element {i} has {} bytes; the limit is {}",
                    text.len(),
                    config.max_input_bytes
                ),
            ));
        }
    }
    Ok(texts)
}

/// `BYTES` elements in the binary layout: a 4-byte little-endian length, then that many bytes.
fn byte_elements(mut data: &[u8]) -> Result<Vec<String>, Response> {
    let mut texts = Vec::new();
    while !data.is_empty() {
        let Some((length, rest)) = data.split_first_chunk::<4>() else {
            return Err(bad("the binary data of `TEXT` ends inside an element's 4-byte length"));
        };
        let length = u32::from_le_bytes(*length) as usize;
        if length > rest.len() {
            return Err(bad(format!("a `TEXT` element says {length} bytes but only {} remain", rest.len())));
        }
        let (text, rest) = rest.split_at(length);
        texts.push(
            String::from_utf8(text.to_vec())
                .map_err(|_| bad(format!("`TEXT` element {} is not UTF-8", texts.len())))?,
        );
        data = rest;
    }
    Ok(texts)
}

/// The strings of a (possibly nested) JSON `data` array, row-major.
fn flatten(value: &Value, into: &mut Vec<String>) -> Result<(), Response> {
    match value {
        Value::Array(items) => items.iter().try_for_each(|item| flatten(item, into)),
        Value::String(text) => {
            into.push(text.clone());
            Ok(())
        }
        Value::Null => Err(bad(format!("input `{INPUT}` has no `data` (nor binary_data_size)"))),
        other => Err(bad(format!("input `{INPUT}` data must be strings, not {other}"))),
    }
}

/// The outputs asked for: each named one (known, and at most once), or all of them.
fn outputs(asked: Option<&Value>, binary_output: bool, labels: usize) -> Result<Vec<Wanted>, Response> {
    let Some(asked) = asked else {
        return Ok(OUTPUTS
            .iter()
            .map(|name| Wanted { name: (*name).into(), binary: binary_output, classes: None })
            .collect());
    };
    let asked = asked.as_array().ok_or_else(|| bad("`outputs` must be an array"))?;
    let mut wanted: Vec<Wanted> = Vec::new();
    for output in asked {
        let name = output["name"].as_str().unwrap_or_default();
        if !OUTPUTS.contains(&name) {
            return Err(bad(format!("unknown output `{name}`; the model has {}", OUTPUTS.join(", "))));
        }
        if wanted.iter().any(|w| w.name == name) {
            return Err(bad(format!("output `{name}` is asked for twice")));
        }
        let parameters = output.get("parameters");
        let binary = parameters.and_then(|p| p.get("binary_data")).and_then(Value::as_bool).unwrap_or(binary_output);
        let classes = match parameters.and_then(|p| p.get("classification")) {
            None | Some(Value::Null) => None,
            Some(k) => match k.as_u64() {
                Some(k) if k >= 1 && k as usize <= labels => Some(k as usize),
                _ => {
                    return Err(bad(format!(
                        "output `{name}`: classification must be an integer from 1 to the model's {labels} labels, not {k}"
                    )));
                }
            },
        };
        wanted.push(Wanted { name: name.into(), binary, classes });
    }
    Ok(wanted)
}

/// A row's top `k` classes, highest first, as the classification extension writes them.
fn top_classes(row: &[f32], k: usize, labels: &[String]) -> Vec<String> {
    ranked(row).into_iter().take(k).map(|i| format!("{}:{i}:{}", row[i], labels[i])).collect()
}

/// An output tensor's values.
enum Tensor<'a> {
    Fp32(Vec<&'a [f32]>),
    Classes(Vec<Vec<String>>),
}

impl Tensor<'_> {
    fn datatype(&self) -> &'static str {
        match self {
            Self::Fp32(_) => "FP32",
            Self::Classes(_) => "BYTES",
        }
    }

    fn width(&self, labels: usize) -> usize {
        match self {
            Self::Fp32(_) => labels,
            Self::Classes(rows) => rows.first().map_or(0, Vec::len),
        }
    }

    /// Row-major, as the JSON `data` the protocol gives flat.
    fn json(&self) -> Value {
        match self {
            Self::Fp32(rows) => json!(rows.iter().flat_map(|row| row.iter()).collect::<Vec<_>>()),
            Self::Classes(rows) => json!(rows.iter().flatten().collect::<Vec<_>>()),
        }
    }

    /// The binary layout: little-endian f32s, or length-prefixed strings.
    fn bytes(&self) -> Vec<u8> {
        match self {
            Self::Fp32(rows) => rows.iter().flat_map(|row| row.iter()).flat_map(|x| x.to_le_bytes()).collect(),
            Self::Classes(rows) => rows
                .iter()
                .flatten()
                .flat_map(|text| (text.len() as u32).to_le_bytes().into_iter().chain(text.bytes()))
                .collect(),
        }
    }
}

impl Describe for KServe {
    fn describe() -> String {
        let error = json!({ "description": "The protocol's error", "content": { "application/json": { "schema": {
            "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } } } } } });
        let ok = |description: &str| {
            json!({ "description": description, "content": { "application/json": {
            "schema": { "type": "object" } } } })
        };
        let model = json!({ "name": "model", "in": "path", "required": true, "schema": { "type": "string" } });
        json!({ "paths": {
            "/v2": { "get": { "summary": "Open Inference Protocol: server metadata", "responses": { "200": ok("Server metadata") } } },
            "/v2/health/live": { "get": { "summary": "Liveness", "responses": { "200": ok("Live") } } },
            "/v2/health/ready": { "get": { "summary": "Readiness", "responses": { "200": ok("Ready") } } },
            "/v2/models/{model}": { "get": {
                "summary": "Model metadata: input TEXT (BYTES), outputs SCORES and LOGITS (FP32)",
                "parameters": [model], "responses": { "200": ok("Model metadata"), "404": error },
            } },
            "/v2/models/{model}/ready": { "get": {
                "summary": "Model readiness", "parameters": [model], "responses": { "200": ok("Ready"), "404": error },
            } },
            "/v2/models/{model}/infer": { "post": {
                "summary": "Inference, with the classification and binary tensor data extensions",
                "description": "JSON, or a JSON header of Inference-Header-Content-Length bytes followed by binary tensor data.",
                "parameters": [model],
                "requestBody": { "required": true, "content": {
                    "application/json": { "schema": { "type": "object", "required": ["inputs"] } },
                    "application/octet-stream": { "schema": { "type": "string", "format": "binary" } },
                } },
                "responses": { "200": ok("Outputs (JSON, or a JSON header and binary data)"), "400": error, "404": error, "413": error },
            } },
        } })
        .to_string()
    }
}

batchbox_sdk::export_plugin!(KServe);
