//! `medvault bench --http`: the real server, driven over real TLS by a load generator in
//! this process.
//!
//! A temporary data directory is made with `init`, a physician and `patients` synthetic
//! charts (the demo generator, through the secure path); then `medvault serve` is started
//! as a child process on a loopback port with its request log going to a file (as in
//! production), and `connections` keep-alive HTTP/1.1 connections over TLS 1.3 send one
//! kind of request each for `seconds`. The static-file row (`/static/console.css`, served
//! by the same server, no authentication, no store) is the in-box ceiling every other row
//! is compared with.

use std::io::BufRead as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use medvault_core::{Caller, Clock as _, Factor, Role};
use serde_json::json;

/// What `bench --http` runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HttpBenchOptions {
    /// Synthetic charts loaded before the run.
    pub patients: usize,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Seconds each row is measured (after half a second of warm-up).
    pub seconds: f64,
    /// The paced read row's target rate (requests per second), for its p99.
    pub paced_rate: f64,
}

/// The rows, in the order they run (`--rows` picks among them; the static file always
/// runs first, as the ceiling).
pub(crate) const ROWS: [&str; 7] = [
    "static file",
    "metadata",
    "read",
    "read (paced)",
    "search",
    "$everything",
    "write",
];

/// One row of the table: achieved rate, latency percentiles (µs), bytes per response body,
/// and answers that were not 2xx (or failed).
#[derive(Debug, Clone)]
pub(crate) struct HttpRow {
    pub operation: &'static str,
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub bytes: usize,
    pub errors: u64,
    /// The status of the first answer that was not 2xx (0: the connection failed).
    pub error_status: Option<u16>,
}

/// One kind of request.
struct Target {
    operation: &'static str,
    method: hyper::Method,
    /// Paths cycled through by the connections.
    paths: Vec<String>,
    /// Bodies cycled through beside the paths (none for a GET).
    bodies: Vec<Bytes>,
    token: Option<String>,
    /// Requests per second across all connections; `None` sends as fast as answers come.
    rate: Option<f64>,
}

/// The server child: killed when dropped, so a failed bench never leaves it running.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the HTTP benchmark and prints its table (or JSON with `json`).
pub(crate) fn run(
    opts: HttpBenchOptions,
    only: &[String],
    server_exe: Option<&Path>,
    json: bool,
) -> Result<()> {
    for r in only {
        if !ROWS.contains(&r.as_str()) {
            bail!("unknown row `{r}` (rows: {})", ROWS.join(", "));
        }
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    let bar = crate::progress_bar(3, "preparing the data directory");
    let setup = prepare(&dir, opts.patients)?;
    if let Some(b) = &bar {
        b.set_position(1);
        b.set_message("starting medvault serve");
    }
    let exe = match server_exe {
        Some(p) => {
            older_config(&dir)?;
            p.to_owned()
        }
        None => std::env::current_exe()?,
    };
    let log = std::fs::File::create(tmp.path().join("server.log"))?;
    let mut child = std::process::Command::new(exe)
        .arg("--data-dir")
        .arg(&dir)
        .args(["serve", "--listen", "127.0.0.1:0"])
        // One address and one token send everything: the per-address and per-token rate
        // limits would measure themselves.
        .env("MEDVAULT_LIMITS_PER_ADDRESS_PER_SEC", "0")
        .env("MEDVAULT_LIMITS_PER_TOKEN_PER_SEC", "0")
        // Detection runs on every access, but one physician reading every chart many times
        // a second is mass export: its automatic response (step-up) would turn the rest of
        // the run into 403s.
        .env("MEDVAULT_DETECT_STEP_UP", "")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .context("cannot start medvault serve")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no output from medvault serve"))?;
    let child = Child(child);
    let mut first = String::new();
    std::io::BufReader::new(stdout).read_line(&mut first)?;
    let url = first
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| anyhow!("medvault serve did not start: {}", first.trim()))?
        .to_owned();
    let addr = url
        .strip_prefix("https://")
        .ok_or_else(|| anyhow!("unexpected server address {url}"))?
        .to_owned();
    let tls = client_tls(&setup.cert_pem)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let token = setup.token.clone();
    let charts: Vec<String> = rt.block_on(open_charts(&addr, &tls, &token, &setup.patients))?;
    if charts.is_empty() {
        bail!("the physician can open none of the synthetic charts");
    }
    let observation = |pid: &str| {
        json!({"resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
            "subject": {"reference": format!("Patient/{pid}")},
            "effectiveDateTime": "2026-11-01T08:00:00Z",
            "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}})
        .to_string()
    };
    let each = |f: &dyn Fn(&str) -> String| charts.iter().map(|c| f(c)).collect::<Vec<_>>();
    let targets = [
        Target {
            operation: "static file",
            method: hyper::Method::GET,
            paths: vec!["/static/console.css".into()],
            bodies: vec![],
            token: None,
            rate: None,
        },
        Target {
            operation: "metadata",
            method: hyper::Method::GET,
            paths: vec!["/fhir/metadata".into()],
            bodies: vec![],
            token: None,
            rate: None,
        },
        Target {
            operation: "read",
            method: hyper::Method::GET,
            paths: each(&|c| format!("/fhir/Patient/{c}")),
            bodies: vec![],
            token: Some(token.clone()),
            rate: None,
        },
        Target {
            operation: "read (paced)",
            method: hyper::Method::GET,
            paths: each(&|c| format!("/fhir/Patient/{c}")),
            bodies: vec![],
            token: Some(token.clone()),
            rate: Some(opts.paced_rate),
        },
        Target {
            operation: "search",
            method: hyper::Method::GET,
            paths: each(&|c| format!("/fhir/Observation?patient={c}&_count=10")),
            bodies: vec![],
            token: Some(token.clone()),
            rate: None,
        },
        Target {
            operation: "$everything",
            method: hyper::Method::GET,
            paths: each(&|c| format!("/fhir/Patient/{c}/$everything")),
            bodies: vec![],
            token: Some(token.clone()),
            rate: None,
        },
        Target {
            operation: "write",
            method: hyper::Method::POST,
            paths: vec!["/fhir/Observation".into()],
            // Each request to another chart, as a ward's writes are.
            bodies: charts.iter().map(|c| Bytes::from(observation(c))).collect(),
            token: Some(token.clone()),
            rate: None,
        },
    ];
    if let Some(b) = &bar {
        b.set_position(2);
    }
    let mut rows = vec![];
    for t in targets.iter().filter(|t| {
        t.operation == "static file" || only.is_empty() || only.iter().any(|o| o == t.operation)
    }) {
        if let Some(b) = &bar {
            b.set_message(format!("measuring {}", t.operation));
        }
        rows.push(rt.block_on(drive(&addr, &tls, t, opts))?);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    drop(child);
    let ceiling = rows.first().map_or(1.0, |r| r.per_sec.max(1e-9));
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                json!({"operation": r.operation, "per_sec": r.per_sec, "p50_us": r.p50_us,
                    "p99_us": r.p99_us, "bytes": r.bytes, "errors": r.errors, "error_status": r.error_status,
                    "ratio_to_static": r.per_sec / ceiling})
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        println!(
            "medvault bench --http: medvault serve over TLS 1.3 (HTTP/1.1 keep-alive), {} connections, {} s per row, {} patients, SQLite",
            opts.connections, opts.seconds, opts.patients
        );
        print!("{}", render(&rows));
    }
    Ok(())
}

/// The table as text: each row's rate beside the static file's.
pub(crate) fn render(rows: &[HttpRow]) -> String {
    let ceiling = rows.first().map_or(1.0, |r| r.per_sec.max(1e-9));
    let mut s = format!(
        "{:<14} {:>10} {:>9} {:>9} {:>10} {:>8} {:>7}\n",
        "operation", "req/s", "p50", "p99", "vs static", "bytes", "errors"
    );
    for r in rows {
        let errors = match r.error_status {
            Some(st) => format!("{} ({st})", r.errors),
            None => r.errors.to_string(),
        };
        s.push_str(&format!(
            "{:<14} {:>10.0} {:>7.0}µs {:>7.0}µs {:>10.2} {:>8} {:>7}\n",
            r.operation,
            r.per_sec,
            r.p50_us,
            r.p99_us,
            r.per_sec / ceiling,
            r.bytes,
            errors
        ));
    }
    s
}

/// For `--server-exe` (an earlier build, whose configuration refuses keys it does not
/// know): `medvault.toml` without the settings added since 0.13 (`[limits]`,
/// `[supply_chain]`, `storage.allow_plaintext_postgres`); their defaults are what that
/// build had, or less.
fn older_config(dir: &Path) -> Result<()> {
    let path = dir.join(crate::config::FILE);
    let text = std::fs::read_to_string(&path)?;
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        if line.starts_with('[') {
            skipping = matches!(line.trim(), "[limits]" | "[supply_chain]");
        }
        if skipping || line.starts_with("allow_plaintext_postgres") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    std::fs::write(&path, out)?;
    Ok(())
}

/// What the load needs from the data directory.
struct Setup {
    token: String,
    patients: Vec<String>,
    cert_pem: Vec<u8>,
}

/// `init`, a physician on the synthetic charts' care team, the charts, and a signed-in
/// session for the physician (password and TOTP, as over HTTP).
fn prepare(dir: &Path, patients: usize) -> Result<Setup> {
    crate::init(dir, "admin", None, None, crate::KeyProvider::File)?;
    let (cfg, vault, op) = crate::open(dir)?;
    let admin = Caller::cli(&op, Role::SecurityAdmin);
    let user = vault
        .add_user(&admin, "physician", Role::Physician, None)
        .map_err(crate::describe)?;
    let care_team: Vec<String> = user.practitioner_id.iter().cloned().collect();
    let mut ids = vec![];
    for bundle in crate::demo::bundles(7, patients.max(1), &care_team, crate::DEMO_BUNDLE) {
        let written = vault
            .transaction(&Caller::cli(&op, Role::Importer), bundle, "import", false)
            .map_err(crate::describe)?;
        ids.extend(
            written
                .iter()
                .filter_map(|e| e.location.strip_prefix("Patient/"))
                .filter_map(|l| l.split('/').next())
                .map(str::to_owned),
        );
    }
    let anon = Caller::anonymous(Some("127.0.0.1".into()), "bench".into());
    let challenge = vault
        .login(&anon, "physician", &user.password)
        .map_err(crate::describe)?;
    let code =
        medvault_core::totp_now(&user.totp_secret, crate::SystemClock.now().unix_timestamp())
            .ok_or_else(|| anyhow!("cannot compute the TOTP code"))?;
    let grant = vault
        .login_factor(&anon, &challenge.mfa_token, &Factor::Totp(&code))
        .map_err(crate::describe)?;
    let cert_pem = std::fs::read(dir.join(&cfg.tls.cert))?;
    Ok(Setup {
        token: grant.token.expose().to_owned(),
        patients: ids,
        cert_pem,
    })
}

/// A TLS client trusting the data directory's own certificate.
fn client_tls(cert_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem) {
        roots.add(c.map_err(|_| anyhow!("cannot read the server certificate"))?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One keep-alive connection over TLS.
async fn connect(addr: &str, tls: &Arc<rustls::ClientConfig>) -> Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends one request; its status and body length.
async fn send(
    sender: &mut Sender,
    addr: &str,
    method: &hyper::Method,
    path: &str,
    body: Option<&Bytes>,
    token: Option<&str>,
) -> Result<(u16, usize)> {
    let mut req = hyper::Request::builder()
        .method(method.clone())
        .uri(path)
        .header(hyper::header::HOST, addr)
        .header(hyper::header::ACCEPT, "application/fhir+json");
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/fhir+json");
    }
    let req = req.body(Full::new(body.cloned().unwrap_or_default()))?;
    sender.ready().await?;
    let res = sender.send_request(req).await?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, body.len()))
}

/// The charts the physician may open whole (the demo leaves every fourth off the care
/// team).
async fn open_charts(
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
    token: &str,
    candidates: &[String],
) -> Result<Vec<String>> {
    let mut sender = connect(addr, tls).await?;
    let mut open = vec![];
    for id in candidates.iter().take(400) {
        // The whole chart (demographics alone are open to every clinician).
        let path = format!("/fhir/Patient/{id}/$everything");
        let (status, _) = send(
            &mut sender,
            addr,
            &hyper::Method::GET,
            &path,
            None,
            Some(token),
        )
        .await?;
        if status == 200 {
            open.push(id.clone());
        }
    }
    Ok(open)
}

/// Measures one target: `connections` tasks for the row's time after a warm-up.
async fn drive(
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
    t: &Target,
    opts: HttpBenchOptions,
) -> Result<HttpRow> {
    let conns = opts.connections.max(1);
    let warm = Duration::from_millis(500);
    let run = Duration::from_secs_f64(opts.seconds.max(0.1));
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let measured_from = start + warm;
    let end = measured_from + run;
    // Per connection, a request every `interval` when paced (latency counts from when the
    // request was due, so a stall is not hidden by the requests it delayed).
    let interval = t
        .rate
        .map(|r| Duration::from_secs_f64(conns as f64 / r.max(1.0)));
    let mut tasks = vec![];
    for k in 0..conns {
        let mut sender = connect(addr, tls).await?;
        let addr = addr.to_owned();
        let method = t.method.clone();
        let paths = t.paths.clone();
        let bodies = t.bodies.clone();
        let token = t.token.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<Duration> = Vec::with_capacity(65_536);
            let (mut errors, mut bytes) = (0u64, 0usize);
            let mut error_status = None;
            let mut i = k;
            let offset = interval.map_or(Duration::ZERO, |iv| iv.mul_f64(k as f64 / conns as f64));
            let mut next_due = start + offset;
            let mut last_done: Option<std::time::Instant> = None;
            loop {
                // When this request is due: on its schedule when paced, else now.
                let due = match interval {
                    Some(iv) => {
                        tokio::time::sleep_until(next_due).await;
                        let d = next_due;
                        next_due += iv;
                        d
                    }
                    None => tokio::time::Instant::now(),
                };
                if due >= end {
                    break;
                }
                let path = paths
                    .get(i % paths.len().max(1))
                    .cloned()
                    .unwrap_or_default();
                let body = bodies.get(i % bodies.len().max(1)).cloned();
                i += conns;
                let sent = due.into_std();
                let r = send(
                    &mut sender,
                    &addr,
                    &method,
                    &path,
                    body.as_ref(),
                    token.as_deref(),
                )
                .await;
                if due < measured_from {
                    continue;
                }
                match r {
                    Ok((s, n)) if (200..300).contains(&s) => {
                        lat.push(sent.elapsed());
                        last_done = Some(std::time::Instant::now());
                        bytes = n;
                    }
                    Ok((s, _)) => {
                        errors += 1;
                        error_status = error_status.or(Some(s));
                    }
                    Err(_) => {
                        errors += 1;
                        error_status = error_status.or(Some(0));
                        break;
                    }
                }
            }
            (lat, errors, bytes, error_status, last_done)
        }));
    }
    let mut lat = vec![];
    let (mut errors, mut bytes, mut error_status) = (0u64, 0usize, None);
    let mut finished = measured_from.into_std();
    for task in tasks {
        let (l, e, b, s, done) = task.await?;
        lat.extend(l);
        errors += e;
        bytes = bytes.max(b);
        error_status = error_status.or(s);
        finished = finished.max(done.unwrap_or(finished));
    }
    // The achieved rate: what was answered, over the time it took to answer it (a paced
    // row that falls behind finishes after its window, so it shows what was achieved, not
    // what was offered).
    let took = finished
        .saturating_duration_since(measured_from.into_std())
        .max(run);
    lat.sort();
    let at = |q: f64| {
        let i = ((lat.len() as f64 - 1.0) * q).round() as usize;
        lat.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    Ok(HttpRow {
        operation: t.operation,
        per_sec: lat.len() as f64 / took.as_secs_f64(),
        p50_us: at(0.5),
        p99_us: at(0.99),
        bytes,
        errors,
        error_status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_compares_every_row_with_the_static_file() {
        let row = |operation, per_sec| HttpRow {
            operation,
            per_sec,
            p50_us: 100.0,
            p99_us: 900.0,
            bytes: 1200,
            errors: 0,
            error_status: None,
        };
        let table = render(&[row("static file", 40_000.0), row("read", 20_000.0)]);
        let read = table.lines().find(|l| l.starts_with("read")).unwrap();
        assert!(read.contains("0.50"), "{read}");
        assert!(read.contains("20000"), "{read}");
    }
}
