//! The API server: axum on a unix socket. Handlers are thin: parse, lock, call the daemon.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tower::ServiceExt;
use tracing::{info, warn};

use super::{Connect, ContainerCreate, Disconnect, ErrorBody, NetworkCreate, ProcessReport};
use crate::daemon::{Config, Daemon, EarlyView, Shared};
use crate::error::{Error, Result};

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if let Error::Internal(e) = &self {
            warn!("request failed: {e:#}");
        }
        (status, axum::Json(ErrorBody { message: self.to_string() })).into_response()
    }
}

type Json = axum::Json<Value>;

fn body<T: DeserializeOwned>(b: &Bytes) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| Error::BadRequest(format!("invalid request body: {e}")))
}

/// Binds the socket, refusing to steal it from a live daemon and clearing a stale one.
async fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            bail!("another daemon is already listening on {}", socket.display());
        }
        std::fs::remove_file(socket).with_context(|| format!("removing stale socket {}", socket.display()))?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let l = UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
}

/// Runs the daemon until SIGINT/SIGTERM. The API answers as soon as the state is loaded:
/// `ps` from the state while the datapath loads (see [`gate`]), everything once the daemon is
/// up; changes then wait for the first reconcile, reads do not. Containers, their wiring and
/// the datapath stay in place when it stops, so a restarted daemon picks them up again
/// (unless `--shutdown-containers`).
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let listener = bind(&cfg.socket).await?;
    let (stage, stage_rx) = watch::channel(Stage::Loading);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        axum::serve(listener, Router::new().fallback(gate).with_state(stage_rx))
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .into_future(),
    );
    let fail = |e: anyhow::Error, stop: tokio::sync::oneshot::Sender<()>| {
        // Requests waiting for the daemon hear why it did not come up.
        stage.send_replace(Stage::Failed(format!("{e:#}")));
        let _ = stop.send(());
        let _ = std::fs::remove_file(&cfg.socket);
        Err(e)
    };
    let early = stage.clone();
    let daemon = match Daemon::start(&cfg, move |v| _ = early.send_replace(Stage::Early(Arc::new(v)))).await {
        Ok(d) => d,
        Err(e) => return fail(e, stop),
    };
    if let Some(addr) = cfg.metrics_addr
        && let Err(e) = crate::daemon::metrics::serve(daemon.clone(), addr).await
    {
        return fail(e, stop);
    }
    if let Some(p) = &cfg.docker_plugin_socket
        && let Err(e) = crate::docker::serve(daemon.clone(), p).await
    {
        return fail(e, stop);
    }
    stage.send_replace(Stage::Up(router(daemon.clone())));
    info!(
        "netpath daemon listening on {} (state {}, pins {})",
        cfg.socket.display(),
        cfg.state_dir.display(),
        cfg.bpffs.display(),
    );
    let d = daemon.clone();
    tokio::spawn(async move {
        d.reconcile().await;
        info!("uplinks: {:?}", d.uplinks());
        tokio::spawn(d.clone().follow_host());
        d.housekeeping().await;
    });
    shutdown().await;
    // Followers' streams never end on their own: the graceful shutdown would wait for them.
    daemon.stop_flow_events();
    let _ = stop.send(());
    let res = server.await.context("the API server task")?;
    let _ = std::fs::remove_file(&cfg.socket);
    if let Some(p) = &cfg.docker_plugin_socket {
        let _ = std::fs::remove_file(p);
    }
    // Veths of containers removed just before: deleted now rather than left to the next start.
    if tokio::time::timeout(std::time::Duration::from_secs(10), daemon.drain_reaper()).await.is_err() {
        tracing::warn!("removed containers' veths are still being deleted; the next start sweeps what is left");
    }
    if cfg.shutdown_containers {
        info!("stopping every container (--shutdown-containers)");
        daemon.shutdown_containers().await;
    }
    daemon.save_snapshot();
    info!("netpath daemon stopped");
    res.context("serving the API")
}

/// How far the daemon is: what the API can answer.
#[derive(Clone)]
enum Stage {
    /// Reading the state: every request waits.
    Loading,
    /// State read, datapath loading: `ps` is answered, everything else waits.
    Early(Arc<EarlyView>),
    /// Up: every request goes to the full [`router`].
    Up(Router),
    /// Did not start: waiting requests get this error.
    Failed(String),
}

/// The one handler in front of the API: answers what the stage allows, holds the rest until
/// the daemon is up (the socket is bound before it starts, so clients connect at once).
async fn gate(State(mut stage): State<watch::Receiver<Stage>>, req: axum::extract::Request) -> Response {
    loop {
        let now = stage.borrow_and_update().clone();
        match now {
            Stage::Up(r) => return r.oneshot(req).await.into_response(),
            Stage::Early(v) if req.method() == axum::http::Method::GET => match req.uri().path() {
                "/_ping" => return "OK".into_response(),
                "/containers" => {
                    return match Query::<ListQuery>::try_from_uri(req.uri()) {
                        Ok(q) => json_bytes(v.list_containers(q.all).await),
                        Err(rejected) => rejected.into_response(), // as the full router would
                    };
                }
                _ => {}
            },
            Stage::Failed(msg) => {
                return Error::Unavailable(format!("the daemon did not start: {msg}")).into_response();
            }
            _ => {}
        }
        if stage.changed().await.is_err() {
            return Error::Unavailable("the daemon is stopping".into()).into_response();
        }
    }
}

fn json_bytes(b: Vec<u8>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], b).into_response()
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
}

pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/_ping", get(|| async { "OK" }))
        .route("/system/info", get(system_info))
        .route("/version", get(version))
        .route("/networks", get(list_networks).post(create_network))
        .route("/networks/prune", post(prune_networks))
        .route("/networks/{name}", get(inspect_network).delete(remove_network))
        .route("/networks/{name}/connect", post(connect))
        .route("/networks/{name}/disconnect", post(disconnect))
        .route("/containers", get(list_containers).post(create_container))
        .route("/containers/{name}", get(inspect_container).delete(remove_container))
        .route("/containers/{name}/stop", post(stop_container))
        .route("/containers/{name}/process", post(report_process))
        .route("/containers/{name}/logs", get(logs))
        .route("/containers/{name}/ports", get(container_ports))
        .route("/attachments", get(inspect_attachment).post(attach).delete(detach))
        .route("/attachments/gc", post(attach_gc))
        .route("/services", get(list_services).post(create_service))
        .route("/services/{name}", get(inspect_service).delete(remove_service).post(update_service))
        .route("/services/{name}/tasks", get(service_tasks))
        .route("/firewall/rules", get(list_rules).post(add_rules))
        .route("/firewall/rules/{name}", axum::routing::delete(remove_rule))
        .route("/nodes", get(list_nodes))
        .route("/nodes/{name}", axum::routing::delete(remove_node))
        .route("/datapath/counters", get(counters))
        .route("/datapath/flows", get(flows))
        .route("/datapath/flows/events", get(flow_events))
        .route_layer(axum::middleware::from_fn_with_state(shared.clone(), crate::daemon::metrics::time_requests))
        .with_state(shared)
}

/// This daemon's version and the build id of the eBPF object it runs.
async fn version(State(d): State<Shared>) -> Json {
    let object = d.datapath_object_id();
    axum::Json(serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "ebpf_object": object }))
}

async fn list_services(State(d): State<Shared>) -> Json {
    axum::Json(d.list_services())
}

async fn create_service(State(d): State<Shared>, b: Bytes) -> Result<(StatusCode, Json)> {
    let req: crate::api::ServiceCreate = body(&b)?;
    Ok((StatusCode::CREATED, axum::Json(d.create_service(req).await?)))
}

async fn inspect_service(State(d): State<Shared>, UrlPath(name): UrlPath<String>) -> Result<Json> {
    Ok(axum::Json(d.inspect_service(&name)?))
}

async fn update_service(State(d): State<Shared>, UrlPath(name): UrlPath<String>, b: Bytes) -> Result<Json> {
    let req: crate::api::ServiceUpdate = body(&b)?;
    Ok(axum::Json(d.update_service(&name, req).await?))
}

async fn remove_service(State(d): State<Shared>, UrlPath(name): UrlPath<String>) -> Result<StatusCode> {
    d.remove_service(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn service_tasks(State(d): State<Shared>, UrlPath(name): UrlPath<String>) -> Result<Json> {
    Ok(axum::Json(d.service_tasks(&name)?))
}

async fn list_rules(State(d): State<Shared>) -> Json {
    axum::Json(d.list_firewall_rules())
}

/// One rule (an object) or several at once (an array: all or none are added).
async fn add_rules(State(d): State<Shared>, b: Bytes) -> Result<(StatusCode, Json)> {
    let reqs: Vec<crate::api::FirewallRuleCreate> = match body::<Value>(&b)? {
        Value::Array(_) => body(&b)?,
        _ => vec![body(&b)?],
    };
    Ok((StatusCode::CREATED, axum::Json(d.add_firewall_rules(reqs).await?)))
}

async fn remove_rule(State(d): State<Shared>, UrlPath(name): UrlPath<String>) -> Result<StatusCode> {
    d.remove_firewall_rule(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_nodes(State(d): State<Shared>) -> Result<Json> {
    Ok(axum::Json(d.nodes()?))
}

async fn remove_node(State(d): State<Shared>, UrlPath(name): UrlPath<String>) -> Result<StatusCode> {
    d.remove_node(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_networks(State(d): State<Shared>) -> Json {
    axum::Json(d.list_networks())
}

async fn create_network(State(d): State<Shared>, b: Bytes) -> Result<(StatusCode, Json)> {
    let req: NetworkCreate = body(&b)?;
    Ok((StatusCode::CREATED, axum::Json(d.create_network(req).await?)))
}

async fn prune_networks(State(d): State<Shared>) -> Result<Json> {
    Ok(axum::Json(d.prune_networks().await?))
}

async fn inspect_network(State(d): State<Shared>, UrlPath(name): UrlPath<String>) -> Result<Json> {
    Ok(axum::Json(d.inspect_network(&name)?))
}

async fn remove_network(State(d): State<Shared>, UrlPath(name): UrlPath<String>) -> Result<StatusCode> {
    d.remove_network(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn connect(State(d): State<Shared>, UrlPath(name): UrlPath<String>, b: Bytes) -> Result<Json> {
    let req: Connect = body(&b)?;
    Ok(axum::Json(d.connect(&name, req).await?))
}

async fn disconnect(State(d): State<Shared>, UrlPath(name): UrlPath<String>, b: Bytes) -> Result<StatusCode> {
    let req: Disconnect = body(&b)?;
    d.disconnect(&name, &req.container).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    all: bool,
}

async fn list_containers(State(d): State<Shared>, Query(q): Query<ListQuery>) -> Response {
    json_bytes(d.list_containers(q.all).await)
}

async fn create_container(State(d): State<Shared>, b: Bytes) -> Result<(StatusCode, Json)> {
    let req: ContainerCreate = body(&b)?;
    Ok((StatusCode::CREATED, axum::Json(d.create_container(req).await?)))
}

async fn inspect_container(State(d): State<Shared>, UrlPath(name): UrlPath<String>) -> Result<Json> {
    Ok(axum::Json(d.inspect_container(&name).await?))
}

#[derive(Deserialize)]
struct RmQuery {
    #[serde(default)]
    force: bool,
}

async fn remove_container(
    State(d): State<Shared>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<RmQuery>,
) -> Result<StatusCode> {
    d.remove_container(&name, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stop_container(State(d): State<Shared>, UrlPath(name): UrlPath<String>) -> Result<StatusCode> {
    d.stop_container(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn report_process(State(d): State<Shared>, UrlPath(name): UrlPath<String>, b: Bytes) -> Result<StatusCode> {
    let req: ProcessReport = body(&b)?;
    d.report_process(&name, req).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn logs(State(d): State<Shared>, UrlPath(name): UrlPath<String>) -> Result<Vec<u8>> {
    d.logs(&name)
}

async fn container_ports(State(d): State<Shared>, UrlPath(name): UrlPath<String>) -> Result<Json> {
    Ok(axum::Json(serde_json::to_value(d.ports(&name)?).map_err(|e| Error::Internal(e.into()))?))
}

async fn system_info(State(d): State<Shared>) -> Json {
    axum::Json(d.status())
}

async fn counters(State(d): State<Shared>) -> Result<Json> {
    let c = d.datapath_counters()?;
    Ok(axum::Json(serde_json::to_value(c).map_err(|e| Error::Internal(e.into()))?))
}

async fn flows(State(d): State<Shared>) -> Result<Json> {
    Ok(axum::Json(d.flows()?))
}

#[derive(Deserialize)]
struct FlowEventsQuery {
    container: Option<String>,
}

/// Flow events as they happen, one JSON object per line, until the client goes away.
async fn flow_events(State(d): State<Shared>, Query(q): Query<FlowEventsQuery>) -> Result<Response> {
    let events = d.follow_flows(q.container.as_deref())?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], axum::body::Body::from_stream(events))
        .into_response())
}

async fn attach(State(d): State<Shared>, b: Bytes) -> Result<(StatusCode, Json)> {
    let req: super::attach::Attach = body(&b)?;
    let a = d.attach(req).await?;
    Ok((StatusCode::CREATED, axum::Json(serde_json::to_value(a).map_err(|e| Error::Internal(e.into()))?)))
}

async fn inspect_attachment(State(d): State<Shared>, Query(k): Query<super::attach::AttachKey>) -> Result<Json> {
    Ok(axum::Json(serde_json::to_value(d.attachment(&k)?).map_err(|e| Error::Internal(e.into()))?))
}

async fn detach(State(d): State<Shared>, Query(k): Query<super::attach::AttachKey>) -> Result<StatusCode> {
    d.detach(&k).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn attach_gc(State(d): State<Shared>, b: Bytes) -> Result<Json> {
    let req: super::attach::AttachGc = body(&b)?;
    let gone = d.attach_gc(req).await?;
    Ok(axum::Json(serde_json::json!({ "removed": gone })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{container, network};
    use crate::state::{State, Store};
    use axum::body::Body;
    use axum::http::Request;
    use std::time::Duration;

    async fn send(app: Router, method: &str, uri: &str) -> (u16, String) {
        let req = Request::builder().method(method).uri(uri).body(Body::empty()).unwrap();
        let r = app.oneshot(req).await.unwrap();
        let status = r.status().as_u16();
        let b = axum::body::to_bytes(r.into_body(), usize::MAX).await.unwrap();
        (status, String::from_utf8_lossy(&b).into_owned())
    }

    fn gated() -> (watch::Sender<Stage>, Router) {
        let (stage, rx) = watch::channel(Stage::Loading);
        (stage, Router::new().fallback(gate).with_state(rx))
    }

    #[tokio::test]
    async fn while_the_daemon_starts_ps_is_answered_from_the_state_and_the_rest_waits() {
        let (stage, app) = gated();
        let ping = tokio::spawn(send(app.clone(), "GET", "/_ping"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!ping.is_finished(), "nothing is answered before the state is read");

        let dir = std::env::temp_dir().join(format!("netpath-gate-test-{}", std::process::id()));
        let store = Store::open(&dir).unwrap();
        let n = network("n", "10.5.0.0/24");
        let c = container("c", &n, "10.5.0.2", None);
        let state = State::from_objects(vec![n], vec![c]);
        stage.send_replace(Stage::Early(Arc::new(EarlyView::of(&state, &store))));
        assert_eq!(ping.await.unwrap(), (200, "OK".to_string()));
        let (status, body) = send(app.clone(), "GET", "/containers?all=true").await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!((v[0]["Name"].as_str(), v[0]["State"]["Status"].as_str()), (Some("c"), Some("created")));
        assert_eq!(send(app.clone(), "GET", "/containers").await.1, "[]", "only running ones without all");

        let create = tokio::spawn(send(app.clone(), "POST", "/networks"));
        let inspect = tokio::spawn(send(app.clone(), "GET", "/containers/c"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!create.is_finished() && !inspect.is_finished(), "the rest waits for the daemon");
        let full = Router::new()
            .route("/networks", post(|| async { "created by the daemon" }))
            .route("/containers/{name}", get(|| async { "inspected by the daemon" }));
        stage.send_replace(Stage::Up(full));
        assert_eq!(create.await.unwrap(), (200, "created by the daemon".to_string()));
        assert_eq!(inspect.await.unwrap(), (200, "inspected by the daemon".to_string()));
        assert_eq!(send(app, "GET", "/nowhere").await.0, 404, "the daemon's router answers everything now");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn requests_waiting_for_a_daemon_that_fails_to_start_hear_why() {
        let (stage, app) = gated();
        let waiting = tokio::spawn(send(app.clone(), "POST", "/containers"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        stage.send_replace(Stage::Failed("loading datapath: no bpffs".into()));
        let (status, body) = waiting.await.unwrap();
        assert_eq!(status, 503);
        assert!(body.contains("did not start: loading datapath: no bpffs"), "{body}");
        drop(stage);
        let (status, body) = send(app, "GET", "/_ping").await;
        assert_eq!((status, body.contains("did not start")), (503, true), "later ones too");
    }
}
