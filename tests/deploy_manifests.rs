//! The deployment examples must describe the binary as it really is: every YAML document under
//! `deploy/kubernetes/` parses; the gateway container runs `serve --config`, its ConfigMap's TOML
//! loads with the crate's own `Config::load` (with the container's environment and Secret values,
//! so a typo in a key fails here); its probes name the gRPC port it listens on and a health
//! service it serves, or the admin listener's `/healthz` / `/readyz` on port 9090; secrets come in
//! through environment variables that are real config keys; `--data-dir` is a volume; the pod's
//! grace period outlasts `server.shutdown_grace`. The replicas example (`replicas.yaml`) is
//! three replicas of one Deployment on the PostgreSQL outbox, the database URL from a Secret and
//! nowhere in plain text, rolled with `maxUnavailable: 0`, behind a Service on the gRPC port.
//! `deploy/Dockerfile` builds with `--locked` and runs as a non-root user.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use channel_gateway::api::pb::channel_gateway_server::SERVICE_NAME;
use channel_gateway::config::{Config, ENV_PREFIX, OutboxBackend};
use yaml_rust2::{Yaml, YamlLoader};

/// grpc.health.v1 names the gateway reports: "" (the whole server) and the API service.
fn health_services() -> [&'static str; 2] {
    ["", SERVICE_NAME]
}

/// The admin listener's port (admin.listen defaults to 127.0.0.1:9090) and its probe paths.
const ADMIN_PORT: u16 = 9090;
const ADMIN_DEFAULT_LISTEN: &str = "127.0.0.1:9090";
const ADMIN_LISTEN_ENV: &str = "CHANNEL_GATEWAY__ADMIN__LISTEN";
/// A pod's terminationGracePeriodSeconds when the manifest does not set it.
const K8S_DEFAULT_GRACE_S: i64 = 30;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every YAML document of every `.yaml`/`.yml` file under `dir`, named `file#index`.
fn load_documents(dir: &Path) -> Vec<(String, Yaml)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {}", dir.display());
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let docs = YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", file.display()));
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        for (i, doc) in docs.into_iter().enumerate() {
            if !doc.is_null() {
                out.push((format!("{name}#{i}"), doc));
            }
        }
    }
    out
}

fn str_of(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

/// `metadata.name` of a `kind` document.
fn find_named<'a>(docs: &'a [(String, Yaml)], kind: &str, name: &str) -> Option<&'a Yaml> {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
}

/// The pod spec of a workload document, if it is one.
fn pod_spec(doc: &Yaml) -> Option<&Yaml> {
    match doc["kind"].as_str()? {
        "Pod" => Some(&doc["spec"]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            Some(&doc["spec"]["template"]["spec"])
        }
        "CronJob" => Some(&doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]),
        _ => None,
    }
}

fn args_of(container: &Yaml) -> Vec<String> {
    list(&container["command"])
        .iter()
        .chain(list(&container["args"]))
        .filter_map(str_of)
        .collect()
}

fn is_gateway(container: &Yaml) -> bool {
    let image = container["image"].as_str().unwrap_or("");
    image.contains("channel-gateway") && args_of(container).iter().any(|a| a == "serve")
}

fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&eq).map(String::from)
        }
    })
}

/// The volume mounted at `path` (or at a directory holding it), with the path inside the volume.
fn volume_at<'a>(
    spec: &'a Yaml,
    container: &'a Yaml,
    path: &str,
) -> Option<(&'a Yaml, &'a Yaml, String)> {
    list(&container["volumeMounts"]).iter().find_map(|m| {
        let mount = m["mountPath"].as_str()?.trim_end_matches('/');
        let inner = if path == mount {
            m["subPath"].as_str().unwrap_or("").to_string()
        } else {
            let rest = path.strip_prefix(mount)?.strip_prefix('/')?;
            match m["subPath"].as_str() {
                Some(sub) => format!("{sub}/{rest}"),
                None => rest.to_string(),
            }
        };
        let name = m["name"].as_str()?;
        let volume = list(&spec["volumes"])
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or(&Yaml::BadValue);
        Some((m, volume, inner))
    })
}

/// A gateway container that was checked, with the config it loads.
struct Gateway<'a> {
    /// `file#index` of its workload.
    doc: &'a str,
    workload: &'a Yaml,
    container: &'a Yaml,
    /// `None` when it did not load (a problem says why).
    config: Option<Config>,
}

/// Everything wrong with the gateway containers in these documents, and the containers checked.
fn check_manifests(docs: &[(String, Yaml)]) -> (Vec<Gateway<'_>>, Vec<String>) {
    let mut problems = Vec::new();
    let mut checked = Vec::new();
    for (where_, doc) in docs {
        let Some(spec) = pod_spec(doc) else { continue };
        let containers = list(&spec["initContainers"])
            .iter()
            .chain(list(&spec["containers"]));
        for c in containers.filter(|c| is_gateway(c)) {
            let name = c["name"].as_str().unwrap_or("?");
            let at = format!("{where_} container {name}");
            let config = check_gateway(docs, spec, doc, c, &at, &mut problems);
            checked.push(Gateway {
                doc: where_,
                workload: doc,
                container: c,
                config,
            });
        }
    }
    (checked, problems)
}

fn check_gateway(
    docs: &[(String, Yaml)],
    spec: &Yaml,
    workload: &Yaml,
    c: &Yaml,
    at: &str,
    problems: &mut Vec<String>,
) -> Option<Config> {
    let mut fail = |m: String| problems.push(format!("{at}: {m}"));
    let args = args_of(c);

    // The command line: `serve --config FILE`.
    if !args.iter().any(|a| a == "serve") {
        fail("args must include `serve`".into());
    }
    let Some(config_path) = flag_value(&args, "--config") else {
        fail("args must pass `--config` (the ConfigMap's TOML)".into());
        return None;
    };

    // The config file comes from a ConfigMap volume.
    let Some((_, volume, inner)) = volume_at(spec, c, &config_path) else {
        fail(format!("--config {config_path} is not on any volumeMount"));
        return None;
    };
    let Some(cm_name) = volume["configMap"]["name"].as_str() else {
        fail(format!(
            "--config {config_path} is not on a configMap volume"
        ));
        return None;
    };
    let key = list(&volume["configMap"]["items"])
        .iter()
        .find(|i| i["path"].as_str() == Some(inner.as_str()))
        .and_then(|i| i["key"].as_str())
        .unwrap_or(inner.as_str())
        .to_string();
    let Some(toml_text) = find_named(docs, "ConfigMap", cm_name)
        .and_then(|cm| cm["data"][key.as_str()].as_str())
        .map(String::from)
    else {
        fail(format!("no ConfigMap `{cm_name}` with key `{key}`"));
        return None;
    };

    // The environment as the container would see it; Secret values from their manifests.
    let mut env: Vec<(String, String)> = Vec::new();
    for e in list(&c["env"]) {
        let Some(var) = e["name"].as_str() else {
            continue;
        };
        let secret = &e["valueFrom"]["secretKeyRef"];
        let value = if secret.is_badvalue() {
            str_of(&e["value"]).unwrap_or_default()
        } else {
            if !var.starts_with(ENV_PREFIX) {
                fail(format!(
                    "secret env {var} is not a config key (CHANNEL_GATEWAY__SECTION__KEY)"
                ));
            }
            let (sname, skey) = (
                secret["name"].as_str().unwrap_or(""),
                secret["key"].as_str().unwrap_or(""),
            );
            let Some(s) = find_named(docs, "Secret", sname) else {
                fail(format!("env {var}: no Secret `{sname}` in the manifests"));
                continue;
            };
            match (str_of(&s["stringData"][skey]), str_of(&s["data"][skey])) {
                (Some(v), _) => v,
                (None, Some(_)) => "base64-secret-value".into(),
                _ => {
                    fail(format!("env {var}: Secret `{sname}` has no key `{skey}`"));
                    continue;
                }
            }
        };
        env.push((var.to_string(), value));
    }
    if let Some(listen) = flag_value(&args, "--listen") {
        // As `serve --listen` does.
        env.push((
            "CHANNEL_GATEWAY__SERVER__LISTEN".into(),
            toml::Value::String(listen).to_string(),
        ));
    }

    // The crate's own loader: unknown keys, bad values and missing pairs fail here.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(&key);
    std::fs::write(&file, &toml_text).unwrap();
    let config = match Config::load(Some(&file), env.clone()) {
        Ok(c) => c,
        Err(e)
            if e.to_string().contains("unknown field `admin`")
                && env
                    .iter()
                    .any(|(k, _)| k.starts_with("CHANNEL_GATEWAY__ADMIN__"))
                && !toml_text.contains("[admin") =>
        {
            // This build has no admin listener yet: check everything else; the probe check
            // below still reads admin.listen from the environment.
            eprintln!("note: {at}: this build has no `admin` config section; admin.* unchecked");
            let rest: Vec<_> = env
                .iter()
                .filter(|(k, _)| !k.starts_with("CHANNEL_GATEWAY__ADMIN__"))
                .cloned()
                .collect();
            match Config::load(Some(&file), rest) {
                Ok(c) => c,
                Err(e) => {
                    fail(format!("ConfigMap `{cm_name}` does not load: {e}"));
                    return None;
                }
            }
        }
        Err(e) => {
            fail(format!(
                "ConfigMap `{cm_name}` key `{key}` with the container's env does not load: {e}"
            ));
            return None;
        }
    };

    // The Bot Framework password really reaches the credentials.
    for (var, value) in &env {
        if var == "CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__APP_PASSWORD"
            && !config
                .channels
                .botframework
                .credentials()
                .values()
                .any(|s| s.expose() == value)
        {
            fail(format!("{var} does not end up in the bot's credentials"));
        }
    }

    // --data-dir is a volume (the durable outbox must not live in the container's layer).
    match flag_value(&args, "--data-dir") {
        None => fail("args must pass `--data-dir` on a volume".into()),
        Some(d) => match volume_at(spec, c, &d) {
            None => fail(format!("--data-dir {d} is not on any volumeMount")),
            Some((mount, volume, _)) => {
                let claim_template = list(&workload["spec"]["volumeClaimTemplates"])
                    .iter()
                    .any(|t| t["metadata"]["name"].as_str() == mount["name"].as_str());
                if volume["emptyDir"].is_badvalue()
                    && volume["persistentVolumeClaim"].is_badvalue()
                    && !claim_template
                {
                    fail(format!(
                        "--data-dir {d} must be an emptyDir or a PersistentVolumeClaim"
                    ));
                }
            }
        },
    }

    // Probes: gRPC health on server.listen's port, or the admin listener's HTTP paths.
    let grpc_listen = config.listen_addr().unwrap();
    let admin_listen: Option<SocketAddr> = env
        .iter()
        .find(|(k, _)| k == ADMIN_LISTEN_ENV)
        .map(|(_, v)| v.trim_matches('"').to_string())
        .or_else(|| {
            toml_text
                .parse::<toml::Table>()
                .ok()
                .and_then(|t| t.get("admin")?.get("listen")?.as_str().map(String::from))
        })
        .unwrap_or_else(|| ADMIN_DEFAULT_LISTEN.to_string())
        .parse()
        .ok();
    let ports: BTreeMap<String, i64> = list(&c["ports"])
        .iter()
        .filter_map(|p| {
            Some((
                p["name"].as_str()?.to_string(),
                p["containerPort"].as_i64()?,
            ))
        })
        .collect();
    for (kind, required) in [
        ("readinessProbe", true),
        ("livenessProbe", true),
        ("startupProbe", false),
    ] {
        let probe = &c[kind];
        if probe.is_badvalue() {
            if required {
                fail(format!("has no {kind}"));
            }
            continue;
        }
        if !probe["grpc"].is_badvalue() {
            let g = &probe["grpc"];
            match g["port"].as_i64() {
                Some(p) if p == i64::from(grpc_listen.port()) => {}
                other => fail(format!(
                    "{kind}: gRPC probe port {other:?} is not the port the gateway listens on ({grpc_listen})"
                )),
            }
            let service = g["service"].as_str().unwrap_or("");
            if !health_services().contains(&service) {
                fail(format!(
                    "{kind}: gRPC health service `{service}` is not served (only {:?})",
                    health_services()
                ));
            }
            if grpc_listen.ip().is_loopback() {
                fail(format!(
                    "{kind}: the kubelet probes the pod IP, but the gateway listens on {grpc_listen}"
                ));
            }
        } else if !probe["httpGet"].is_badvalue() {
            let h = &probe["httpGet"];
            let path = h["path"].as_str().unwrap_or("/");
            let expected: &[&str] = match kind {
                "readinessProbe" => &["/readyz"],
                "livenessProbe" => &["/healthz"],
                _ => &["/readyz", "/healthz"],
            };
            if !expected.contains(&path) {
                fail(format!("{kind}: HTTP path {path} is not {expected:?}"));
            }
            let port = match &h["port"] {
                Yaml::Integer(p) => Some(*p),
                Yaml::String(name) => ports.get(name).copied(),
                _ => None,
            };
            if port != Some(i64::from(ADMIN_PORT)) {
                fail(format!(
                    "{kind}: HTTP probe port {port:?} is not the admin port {ADMIN_PORT}"
                ));
            }
            match admin_listen {
                Some(a) if a.port() == ADMIN_PORT && !a.ip().is_loopback() => {}
                other => fail(format!(
                    "{kind}: HTTP probes need admin.listen on a non-loopback address, port {ADMIN_PORT} \
                     (set {ADMIN_LISTEN_ENV}); it is {other:?}"
                )),
            }
        } else {
            fail(format!(
                "{kind}: use a `grpc` probe or an `httpGet` on the admin port (the binary serves those)"
            ));
        }
    }

    // Resources: requests and limits for cpu and memory.
    for (section, res) in [
        ("requests", "cpu"),
        ("requests", "memory"),
        ("limits", "memory"),
    ] {
        if str_of(&c["resources"][section][res]).is_none() {
            fail(format!("resources.{section}.{res} is not set"));
        }
    }

    // The kubelet kills the container after terminationGracePeriodSeconds (30 s when unset): a
    // drain of server.shutdown_grace must end before it.
    let grace = spec["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap_or(K8S_DEFAULT_GRACE_S);
    let drain = config.server.shutdown_grace;
    if u128::try_from(grace).unwrap_or(0) * 1000 <= drain.as_millis() {
        fail(format!(
            "terminationGracePeriodSeconds {grace} does not leave room for server.shutdown_grace \
             ({drain:?}): the kubelet would kill the drain"
        ));
    }
    Some(config)
}

/// The shared-service example: several replicas over one PostgreSQL outbox.
const REPLICAS_FILE: &str = "replicas.yaml";
const REPLICAS: i64 = 3;
const DB_URL_ENV: &str = "CHANNEL_GATEWAY__OUTBOX__POSTGRES__URL";

fn in_replicas_file(doc: &str) -> bool {
    doc.split('#').next() == Some(REPLICAS_FILE)
}

/// Every string value under `y`, with its path (`data.gateway.toml`, `spec.ports[0].name`).
fn strings(y: &Yaml, path: &str, out: &mut Vec<(String, String)>) {
    match y {
        Yaml::String(v) => out.push((path.to_string(), v.clone())),
        Yaml::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                strings(item, &format!("{path}[{i}]"), out);
            }
        }
        Yaml::Hash(map) => {
            for (k, v) in map {
                let key = str_of(k).unwrap_or_default();
                let sub = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                strings(v, &sub, out);
            }
        }
        _ => {}
    }
}

/// Looks like a database URL or a libpq connection string with a password.
fn looks_like_db_url(v: &str) -> bool {
    let v = v.to_ascii_lowercase();
    v.contains("postgres://") || v.contains("postgresql://") || v.contains("password=")
}

/// Everything wrong with the replicas example beyond what every gateway container is checked
/// for: one Deployment of three replicas on the PostgreSQL outbox, whose URL comes from a Secret
/// and is nowhere in plain text; rolled without losing a replica; HTTP probes on the admin port;
/// and a Service that reaches the replicas' gRPC port.
fn check_replicas(docs: &[(String, Yaml)], gateways: &[Gateway<'_>]) -> Vec<String> {
    let mut problems = Vec::new();
    let ours: Vec<&Gateway<'_>> = gateways
        .iter()
        .filter(|g| in_replicas_file(g.doc))
        .collect();
    let [g] = ours.as_slice() else {
        problems.push(format!(
            "{REPLICAS_FILE}: expected one gateway container, found {}",
            ours.len()
        ));
        return problems;
    };
    let at = g.doc;
    let mut fail = |m: String| problems.push(format!("{at}: {m}"));
    let w = g.workload;
    let c = g.container;

    if w["kind"].as_str() != Some("Deployment") {
        fail(format!(
            "the replicas are a {:?}, not a Deployment",
            w["kind"].as_str()
        ));
    }
    let replicas = w["spec"]["replicas"].as_i64();
    if replicas != Some(REPLICAS) {
        fail(format!("spec.replicas must be {REPLICAS}, is {replicas:?}"));
    }
    // A rolling update that never takes a replica away before its successor is ready.
    let strategy = &w["spec"]["strategy"];
    let rolling = strategy["type"].as_str().unwrap_or("RollingUpdate") == "RollingUpdate";
    let max_unavailable = str_of(&strategy["rollingUpdate"]["maxUnavailable"]);
    if !rolling || !matches!(max_unavailable.as_deref(), Some("0" | "0%")) {
        fail(format!(
            "needs a RollingUpdate with maxUnavailable 0 (it has {:?}, maxUnavailable {max_unavailable:?})",
            strategy["type"].as_str()
        ));
    }
    // check_gateway checked the paths and the port of HTTP probes; here they must be HTTP.
    for kind in ["readinessProbe", "livenessProbe"] {
        if c[kind]["httpGet"].is_badvalue() {
            fail(format!("{kind} must be an httpGet on the admin port"));
        }
    }

    // The shared outbox, its URL from a Secret.
    match list(&c["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some(DB_URL_ENV))
    {
        None => fail(format!("{DB_URL_ENV} is not set")),
        Some(e) if e["valueFrom"]["secretKeyRef"].is_badvalue() => fail(format!(
            "{DB_URL_ENV} must come from a Secret (valueFrom.secretKeyRef)"
        )),
        Some(_) => {}
    }
    let url = match &g.config {
        Some(config) => {
            if config.outbox.backend != OutboxBackend::Postgres {
                fail(format!(
                    "outbox.backend is {:?}, not postgres",
                    config.outbox.backend
                ));
            }
            config.outbox.postgres.url.expose().to_string()
        }
        // Its problem is reported already.
        None => String::new(),
    };
    for (name, doc) in docs.iter().filter(|(n, _)| in_replicas_file(n)) {
        if doc["kind"].as_str() == Some("Secret") {
            continue;
        }
        let mut values = Vec::new();
        strings(doc, "", &mut values);
        for (path, v) in values {
            if looks_like_db_url(&v) || (!url.is_empty() && v.contains(url.as_str())) {
                fail(format!(
                    "{name} {path}: the database URL is in plain text (keep it in the Secret)"
                ));
            }
        }
    }

    // A Service selecting the replicas, on the port gRPC listens on.
    let grpc_port = g
        .config
        .as_ref()
        .and_then(|c| c.listen_addr().ok())
        .map(|a| i64::from(a.port()));
    let labels = &w["spec"]["template"]["metadata"]["labels"];
    let named: BTreeMap<String, i64> = list(&c["ports"])
        .iter()
        .filter_map(|p| {
            Some((
                p["name"].as_str()?.to_string(),
                p["containerPort"].as_i64()?,
            ))
        })
        .collect();
    let served = docs
        .iter()
        .filter(|(n, d)| in_replicas_file(n) && d["kind"].as_str() == Some("Service"))
        .filter(|(_, d)| {
            d["spec"]["selector"].as_hash().is_some_and(|sel| {
                !sel.is_empty()
                    && sel
                        .iter()
                        .all(|(k, v)| labels[k.as_str().unwrap_or("")] == *v)
            })
        })
        .flat_map(|(_, d)| list(&d["spec"]["ports"]))
        .any(|p| {
            let target = match &p["targetPort"] {
                Yaml::Integer(t) => Some(*t),
                Yaml::String(name) => named.get(name).copied(),
                // Unset: the Service's own port.
                Yaml::BadValue => p["port"].as_i64(),
                _ => None,
            };
            target.is_some() && target == grpc_port
        });
    if !served {
        fail(format!(
            "no Service selects the replicas on their gRPC port {grpc_port:?}"
        ));
    }
    problems
}

/// Everything wrong with a Dockerfile's build and final stage.
fn check_dockerfile(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    // Join continuation lines; drop comments.
    let mut lines = Vec::new();
    let mut cur = String::new();
    for raw in text.lines() {
        let t = raw.trim();
        if t.starts_with('#') {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
        } else {
            cur.push_str(t);
            if !cur.trim().is_empty() {
                lines.push(std::mem::take(&mut cur));
            }
            cur.clear();
        }
    }
    let word = |l: &str| {
        l.split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase()
    };
    let runs: Vec<&String> = lines.iter().filter(|l| word(l) == "RUN").collect();
    if !runs.iter().any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        w.windows(2).any(|p| p == ["cargo", "build"])
            && w.contains(&"--release")
            && w.contains(&"--locked")
    }) {
        problems.push("no `RUN ... cargo build --release --locked`".into());
    }
    let froms: Vec<usize> = (0..lines.len())
        .filter(|&i| word(&lines[i]) == "FROM")
        .collect();
    if froms.len() < 2 {
        problems.push("not a multi-stage build (a builder stage and a final stage)".into());
    }
    let final_stage = &lines[froms.last().map_or(0, |i| *i)..];
    let users: Vec<&str> = final_stage
        .iter()
        .filter(|l| word(l) == "USER")
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    match users.last() {
        None => problems.push("the final stage has no USER line: it would run as root".into()),
        Some(u) => {
            let user = u.split(':').next().unwrap_or("");
            if user == "root" || user == "0" {
                problems.push(format!("the final stage runs as `{u}`"));
            }
        }
    }
    problems
}

#[test]
fn kubernetes_examples_name_what_the_binary_serves() {
    let docs = load_documents(&repo().join("deploy/kubernetes"));
    let (checked, problems) = check_manifests(&docs);
    assert!(
        problems.is_empty(),
        "deploy/kubernetes:\n  {}",
        problems.join("\n  ")
    );
    assert!(
        checked.len() >= 3,
        "expected a gRPC-probe sidecar, an HTTP-probe sidecar and the replicas, found {}",
        checked.len()
    );
    // Both probe styles are shown.
    let text: String = docs.iter().map(|(_, d)| format!("{d:?}")).collect();
    assert!(
        text.contains("\"grpc\""),
        "no example uses the native gRPC probe"
    );
    assert!(
        text.contains("\"httpGet\""),
        "no example uses the HTTP probes"
    );
}

#[test]
fn the_replicas_example_shares_one_outbox_with_its_url_in_a_secret() {
    let docs = load_documents(&repo().join("deploy/kubernetes"));
    let (gateways, problems) = check_manifests(&docs);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let problems = check_replicas(&docs, &gateways);
    assert!(
        problems.is_empty(),
        "deploy/kubernetes/{REPLICAS_FILE}:\n  {}",
        problems.join("\n  ")
    );
    // What the replicas run with, as the gateway's loader reads it: the Secret's URL, on
    // PostgreSQL, and gRPC reachable from other pods.
    let g = gateways
        .iter()
        .find(|g| in_replicas_file(g.doc))
        .expect("the replicas' gateway container");
    let config = g.config.as_ref().expect("its config loads");
    let secret = find_named(&docs, "Secret", "channel-gateway-secrets-replicas")
        .expect("the replicas' Secret");
    let url = str_of(&secret["stringData"]["database-url"]).expect("a database-url key");
    assert_eq!(config.outbox.postgres.url.expose(), url.as_str());
    assert_eq!(config.outbox.backend, OutboxBackend::Postgres);
    assert!(!config.listen_addr().unwrap().ip().is_loopback());
    assert!(config.auth.is_configured(), "callers must authenticate");
}

#[test]
fn dockerfile_builds_locked_and_runs_unprivileged() {
    let text = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let problems = check_dockerfile(&text);
    assert!(
        problems.is_empty(),
        "deploy/Dockerfile:\n  {}",
        problems.join("\n  ")
    );
    // The build context must carry the lockfile `--locked` needs.
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    for needed in ["Cargo.toml", "Cargo.lock", "build.rs", "proto", "src"] {
        assert!(
            !docker_ignored(&ignore, needed),
            ".dockerignore leaves `{needed}` out of the build context"
        );
    }
}

/// Whether a top-level path is excluded by .dockerignore (last matching pattern wins; `*` only).
fn docker_ignored(ignore: &str, path: &str) -> bool {
    fn glob(p: &str, s: &str) -> bool {
        match p.split_once('*') {
            None => p == s,
            Some((pre, post)) => {
                s.len() >= pre.len() + post.len() && s.starts_with(pre) && s.ends_with(post)
            }
        }
    }
    let mut ignored = false;
    for line in ignore.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (negate, pat) = match line.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, line),
        };
        let pat = pat.trim_start_matches('/').trim_end_matches('/');
        if glob(pat, path) {
            ignored = !negate;
        }
    }
    ignored
}

// The checks themselves must be able to fail: broken copies of the examples.

fn mutated(find: &str, replace: &str) -> Vec<String> {
    let dir = repo().join("deploy/kubernetes");
    let tmp = tempfile::tempdir().unwrap();
    let mut hits = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        hits += text.matches(find).count();
        std::fs::write(
            tmp.path().join(p.file_name().unwrap()),
            text.replace(find, replace),
        )
        .unwrap();
    }
    assert!(
        hits > 0,
        "`{find}` is not in the examples any more; update this test"
    );
    let docs = load_documents(tmp.path());
    let (gateways, mut problems) = check_manifests(&docs);
    problems.extend(check_replicas(&docs, &gateways));
    problems
}

#[test]
fn broken_manifests_are_caught() {
    let cases = [
        // A config key typo in the ConfigMap.
        ("shutdown_grace = ", "shutdown_grase = ", "does not load"),
        // A probe on a port nothing listens on.
        (
            "port: 50051",
            "port: 50052",
            "is not the port the gateway listens on",
        ),
        // A health service the gateway does not report.
        (
            "service: channelgateway.v1.ChannelGateway",
            "service: channelgateway.v1.Gateway",
            "is not served",
        ),
        // A secret env var that is no config key.
        (
            "name: CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__APP_PASSWORD",
            "name: CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__APP_PASWORD",
            "does not load",
        ),
        // gRPC probes against a loopback listener.
        (
            "listen = \"0.0.0.0:50051\"",
            "listen = \"127.0.0.1:50051\"",
            "probes the pod IP",
        ),
        // A wrong HTTP probe path.
        ("path: /healthz", "path: /health", "is not [\"/healthz\"]"),
        // The admin listener left on loopback.
        (
            "value: 0.0.0.0:9090",
            "value: 127.0.0.1:9090",
            "non-loopback",
        ),
        // No --config.
        ("- --config\n", "- --confg\n", "must pass `--config`"),
    ];
    for (find, replace, expect) in cases {
        let problems = mutated(find, replace);
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "replacing `{find}` by `{replace}` should report `{expect}`; got {problems:#?}"
        );
    }
}

#[test]
fn broken_replicas_are_caught() {
    let url_from_secret = "- name: CHANNEL_GATEWAY__OUTBOX__POSTGRES__URL
              valueFrom:
                secretKeyRef:
                  name: channel-gateway-secrets-replicas
                  key: database-url
";
    let url_in_plain = "- name: CHANNEL_GATEWAY__OUTBOX__POSTGRES__URL
              value: postgres://channel_gateway:REPLACE-ME@postgres.example.internal:5432/channel_gateway
";
    let cases = [
        ("replicas: 3", "replicas: 1", "spec.replicas must be 3"),
        ("maxUnavailable: 0", "maxUnavailable: 1", "maxUnavailable 0"),
        // The URL as a plain value instead of the Secret's.
        (url_from_secret, url_in_plain, "must come from a Secret"),
        (url_from_secret, url_in_plain, "in plain text"),
        // The URL written into the ConfigMap (the environment's still wins).
        (
            "    [outbox.postgres]\n",
            "    [outbox.postgres]\n    url = \"postgres://cg:secret@db:5432/cg\"\n",
            "in plain text",
        ),
        // Not the shared outbox.
        ("value: postgres\n", "value: sqlite\n", "not postgres"),
        // An env key that is no config key.
        (
            "name: CHANNEL_GATEWAY__OUTBOX__BACKEND",
            "name: CHANNEL_GATEWAY__OUTBOX__BACKEN",
            "does not load",
        ),
        // The Service aims at the admin port.
        ("targetPort: grpc", "targetPort: admin", "gRPC port"),
        // A grace period the drain does not fit in.
        (
            "terminationGracePeriodSeconds: 60",
            "terminationGracePeriodSeconds: 30",
            "server.shutdown_grace",
        ),
    ];
    for (find, replace, expect) in cases {
        let problems = mutated(find, replace);
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "replacing `{find}` by `{replace}` should report `{expect}`; got {problems:#?}"
        );
    }
}

#[test]
fn broken_dockerfiles_are_caught() {
    let good = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    assert!(check_dockerfile(&good).is_empty());
    let no_user: String = good
        .lines()
        .filter(|l| !l.trim_start().starts_with("USER"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        check_dockerfile(&no_user)
            .iter()
            .any(|p| p.contains("no USER"))
    );
    let root = format!("{good}\nUSER root\n");
    assert!(
        check_dockerfile(&root)
            .iter()
            .any(|p| p.contains("runs as `root`"))
    );
    let unlocked = good.replace("--locked", "");
    assert!(
        check_dockerfile(&unlocked)
            .iter()
            .any(|p| p.contains("--locked"))
    );
    assert!(docker_ignored("*\n!Cargo.toml\n", "Cargo.lock"));
    assert!(!docker_ignored("*\n!Cargo.lock\n", "Cargo.lock"));
}
