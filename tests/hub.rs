//! Hub and sharded loading. No Hub is reachable here, so a small HTTP server on 127.0.0.1 serves a
//! model folder the way the Hub does (`/{repo}/resolve/{revision}/{file}`, ranged GETs with ETag,
//! X-Repo-Commit and Content-Range), and the model is fetched into a temporary cache.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use common::*;
use kedit::model::load::{load, DTypeChoice, HubOptions, LoadOptions};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct FakeHub {
    url: String,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeHub {
    /// Serves the files of `folder` as the repository `repo` at revision `main`.
    fn serve(folder: &Path, repo: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let prefix = format!("/{repo}/resolve/main/");
        let folder = folder.to_path_buf();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (req, st) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: the server stops when told, or after two minutes whatever happens.
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !st.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        req.fetch_add(1, Ordering::SeqCst);
                        stream.set_nonblocking(false).unwrap();
                        respond(stream, &folder, &prefix);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            url,
            requests,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(stream: std::net::TcpStream, folder: &Path, prefix: &str) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let mut out = stream;
    let file = path.strip_prefix(prefix).map(|f| folder.join(f));
    let Some(data) = file.and_then(|f| std::fs::read(f).ok()) else {
        let _ = write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    };
    let total = data.len();
    let (start, end) = match headers.get("range").and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b: usize = if b.is_empty() {
                total - 1
            } else {
                b.parse::<usize>().unwrap().min(total - 1)
            };
            (a, b)
        }
        None => (0, total - 1),
    };
    let etag = format!("{:016x}", fnv1a(&data));
    let _ = write!(
        out,
        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{total}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        end + 1 - start
    );
    let _ = out.write_all(&data[start..=end]);
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// A copy of the tiny GPT-2 with its weights split over two shards and an index.
fn sharded_tiny_gpt2(dir: &Path) -> PathBuf {
    let src = fixture("tiny-gpt2");
    let folder = dir.join("sharded");
    std::fs::create_dir_all(&folder).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), folder.join(f)).unwrap();
    }
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let part: HashMap<String, candle_core::Tensor> = chunk
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        candle_core::safetensors::save(&part, folder.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        folder.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    folder
}

fn opts(cache: &Path, endpoint: Option<String>) -> LoadOptions {
    LoadOptions {
        dtype: DTypeChoice::Exact(candle_core::DType::F32),
        hub: Some(HubOptions {
            cache_dir: cache.to_path_buf(),
            endpoint,
            token: None,
            offline: false,
            progress: false,
        }),
        ..LoadOptions::default()
    }
}

fn last_logits(model: &kedit::model::Model) -> candle_core::Tensor {
    let ids = model.encode("The capital of France is").unwrap();
    logits_alone(model, &ids)
}

#[test]
fn sharded_folder_loads_like_the_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let sharded = sharded_tiny_gpt2(tmp.path());
    let a = tiny_gpt2();
    let b = load(sharded.to_str().unwrap(), &opts(tmp.path(), None)).unwrap();
    assert_eq!(b.origin().files.len(), 2);
    assert_eq!(max_abs_diff(&last_logits(&a), &last_logits(&b)), 0.0);
}

#[test]
fn hub_download_fills_the_cache_and_a_second_load_needs_no_server() {
    for (repo, sharded) in [
        ("kedit-test/tiny-gpt2", false),
        ("kedit-test/tiny-gpt2-sharded", true),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let served = if sharded {
            sharded_tiny_gpt2(tmp.path())
        } else {
            fixture("tiny-gpt2")
        };
        let cache = tmp.path().join("hub-cache");
        let hub = FakeHub::serve(&served, repo);
        let first = load(repo, &opts(&cache, Some(hub.url.clone()))).unwrap();
        assert!(
            hub.requests.load(Ordering::SeqCst) >= 3,
            "nothing was downloaded"
        );
        assert_eq!(first.origin().kind, "hub");
        let snapshot = cache
            .join(format!("models--{}", repo.replace('/', "--")))
            .join("snapshots")
            .join(COMMIT);
        assert!(
            snapshot.join("config.json").exists(),
            "no snapshot at {}",
            snapshot.display()
        );
        let url = hub.url.clone();
        drop(hub);

        // The server is gone: the second load must come from the cache alone.
        let second = load(repo, &opts(&cache, Some(url))).unwrap();
        assert_eq!(
            max_abs_diff(&last_logits(&first), &last_logits(&second)),
            0.0
        );
        assert_eq!(
            max_abs_diff(&last_logits(&first), &last_logits(&tiny_gpt2())),
            0.0
        );
        assert_eq!(second.origin().files.len(), if sharded { 2 } else { 1 });
    }
}

#[test]
fn offline_hub_load_of_an_uncached_model_names_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(tmp.path(), None);
    o.hub.as_mut().unwrap().offline = true;
    let err = load("kedit-test/absent", &o).unwrap_err().to_string();
    assert!(
        err.contains("not in the cache") && err.contains("config.json"),
        "{err}"
    );
}
