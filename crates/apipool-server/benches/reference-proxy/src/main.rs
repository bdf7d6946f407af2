//! `reference-proxy UPSTREAM_HOST:PORT LISTEN_ADDR KEY`: forwards every request to the upstream
//! with `Authorization: Bearer KEY`, buffering bodies (as apipool does for small answers). No key
//! selection, limits, stats, auth or path checks: only what any HTTP/1 proxy must do.
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, HOST, HeaderValue};
use hyper::{Request, Response, StatusCode, body::Incoming};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};

type Upstream = Client<HttpConnector, Full<Bytes>>;

async fn forward(
    client: Upstream,
    cfg: Arc<(String, HeaderValue)>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (mut parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return status(StatusCode::BAD_REQUEST);
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("http://{}{path}", cfg.0).parse() else {
        return status(StatusCode::BAD_REQUEST);
    };
    parts.uri = uri;
    parts.headers.insert(AUTHORIZATION, cfg.1.clone());
    parts.headers.remove(HOST);
    let Ok(resp) = client.request(Request::from_parts(parts, Full::new(body))).await else {
        return status(StatusCode::BAD_GATEWAY);
    };
    let (parts, body) = resp.into_parts();
    match body.collect().await {
        Ok(b) => Response::from_parts(parts, Full::new(b.to_bytes())),
        Err(_) => status(StatusCode::BAD_GATEWAY),
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = code;
    r
}

fn client() -> Upstream {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector)
}

/// A listener on `addr` that others may share (SO_REUSEPORT: the kernel spreads connections).
fn shared_listener(addr: std::net::SocketAddr) -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_reuseport(true).expect("SO_REUSEPORT");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(addr).expect("bind");
    socket.listen(1024).expect("listen")
}

async fn serve(listener: tokio::net::TcpListener, client: Upstream, cfg: Arc<(String, HeaderValue)>) {
    loop {
        let Ok((socket, _)) = listener.accept().await else { continue };
        let _ = socket.set_nodelay(true);
        let (client, cfg) = (client.clone(), cfg.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (client, cfg) = (client.clone(), cfg.clone());
                async move { Ok::<_, Infallible>(forward(client, cfg, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), svc)
                .await;
        });
    }
}

/// One multi-thread runtime (the default), or with `REF_THREADS=N` N threads each running a
/// current-thread runtime with its own listener on the shared port and its own upstream pool
/// (thread per core: no task or wake-up crosses threads).
fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(upstream), Some(listen), Some(key)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: reference-proxy UPSTREAM_HOST:PORT LISTEN_ADDR KEY");
        std::process::exit(2);
    };
    let auth = HeaderValue::from_str(&format!("Bearer {key}")).expect("key fits a header");
    let cfg = Arc::new((upstream, auth));
    let threads: usize = std::env::var("REF_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let addr: std::net::SocketAddr = listen.parse().expect("LISTEN_ADDR");
    if threads == 0 {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
            println!("listening on http://{}", listener.local_addr().expect("addr"));
            serve(listener, client(), cfg).await;
        });
        return;
    }
    let first = std::net::TcpListener::bind(addr).expect("bind");
    let addr = first.local_addr().expect("addr");
    drop(first);
    let mut handles = Vec::new();
    for _ in 0..threads {
        let cfg = cfg.clone();
        handles.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                serve(shared_listener(addr), client(), cfg).await;
            });
        }));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    println!("listening on http://{addr}");
    for h in handles {
        let _ = h.join();
    }
}
