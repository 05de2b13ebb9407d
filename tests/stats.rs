//! Key statistics: equal to E[k kᵀ] computed token by token, cached under a key that a second
//! run finds, and rebuilt (with a warning) when the cache file is damaged.

mod common;

use common::*;
use kedit::editors::rank_one::keys::activations_at;
use kedit::editors::rank_one::stats::{second_moments, Corpus, CovarianceCache, StatsStore};
use kedit::model::Site;

#[test]
fn second_moment_equals_the_mean_outer_product_of_every_key() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus_path = tmp.path().join("corpus.jsonl");
    let texts = [
        "The Eiffel Tower is located in Paris, the capital of France.",
        "Lobsters are blue in life and only turn red when cooked.",
        "A short one.",
    ];
    let lines: Vec<String> = texts
        .iter()
        .map(|t| serde_json::json!({ "text": t }).to_string())
        .collect();
    std::fs::write(&corpus_path, lines.join("\n")).unwrap();
    let corpus = Corpus::from_file(&corpus_path).unwrap();
    let model = tiny_gpt2();
    let mut store = StatsStore::on_disk(tmp.path().join("cache"));
    store.context = 8; // long texts become several windows
    let opts = store.options(100).unwrap();
    let layer = 1;
    let got = second_moments(&model, &[layer], &corpus, &opts, &mut |_, _| {}).unwrap();
    assert!(got[0].computed);

    // By hand: every token's key, each text alone, in 8-token windows.
    let mut items = Vec::new();
    let mut n = 0;
    for t in texts {
        let ids = model.encode_with_special_tokens(t).unwrap();
        for chunk in ids.chunks(8) {
            let text = model.decode(chunk).unwrap();
            assert_eq!(model.encode_with_special_tokens(&text).unwrap(), chunk);
            for pos in 0..chunk.len() {
                items.push((text.clone(), pos));
            }
            n += chunk.len();
        }
    }
    assert_eq!(got[0].tokens as usize, n);
    let keys = activations_at(&model, Site::MlpAct(layer), &items)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    let want = (keys.t().unwrap().matmul(&keys).unwrap() / n as f64).unwrap();
    let diff = (&got[0].second_moment - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(diff <= 1e-5 * scale, "{diff} vs scale {scale}");

    let again = second_moments(&model, &[layer], &corpus, &opts, &mut |_, _| {}).unwrap();
    assert!(!again[0].computed, "the second run reads the cache");
    assert_eq!(again[0].path, got[0].path);
    let same = (&again[0].second_moment - &got[0].second_moment)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert_eq!(same, 0.0);
}

/// Covariances too large to keep are read back from their cache files when an edit asks for
/// them: the same matrices, to the bit, as those held in memory and as the moments computed.
#[test]
fn covariances_read_back_from_disk_equal_those_held() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus_path = tmp.path().join("corpus.jsonl");
    let lines = [
        "Paris is the capital of France.",
        "Lobsters turn red when cooked.",
    ]
    .map(|t| serde_json::json!({ "text": t }).to_string());
    std::fs::write(&corpus_path, lines.join("\n")).unwrap();
    let model = tiny_gpt2();
    let layers = [1, 0];
    let store = StatsStore::on_disk(tmp.path().join("cache"));
    // By reference: a closure that takes the cache by value and mutates it is miscompiled in
    // release builds when called twice with equal arguments (rust-lang/rust#155241, rustc 1.95:
    // the second call was handed the first call's dropped cache).
    let get = |cache: &mut CovarianceCache| {
        cache
            .get(&model, &layers, 10, Some(corpus_path.as_path()), &store)
            .unwrap()
    };
    // Not held: computed into the (empty) cache folder, then read from it.
    let read_back = get(&mut CovarianceCache::holding_at_most(0));
    let held = get(&mut CovarianceCache::default());
    let corpus = Corpus::from_file(&corpus_path).unwrap();
    let computed = second_moments(
        &model,
        &layers,
        &corpus,
        &store.options(10).unwrap(),
        &mut |_, _| {},
    )
    .unwrap();
    for (i, moment) in computed.iter().enumerate() {
        let want: Vec<Vec<f64>> = moment.second_moment.to_vec2().unwrap();
        let owned = [
            read_back.layer_owned(i).unwrap(),
            held.layer_owned(i).unwrap(),
        ];
        let shared = [read_back.layer(i).unwrap(), held.layer(i).unwrap()];
        for got in owned.iter().chain(shared.iter().map(|m| &**m)) {
            assert_eq!((got.nrows(), got.ncols()), (want.len(), want[0].len()));
            for (r, row) in want.iter().enumerate() {
                for (c, &w) in row.iter().enumerate() {
                    assert_eq!(got[(r, c)], w, "layer {} at ({r}, {c})", layers[i]);
                }
            }
        }
    }
    assert!(read_back.layer(2).is_err());
    // A file damaged after it was found is an error naming it, not other numbers.
    let path = computed[0].path.clone().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let err = read_back.layer(0).unwrap_err().to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("checksum"),
        "{err}"
    );
    // So is a truncated one.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 8]).unwrap();
    let err = read_back.layer_owned(0).unwrap_err().to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("truncated"),
        "{err}"
    );
    // Found damaged when asked for, it is gathered again.
    let again = get(&mut CovarianceCache::holding_at_most(0))
        .layer(0)
        .unwrap();
    let want: Vec<Vec<f64>> = computed[0].second_moment.to_vec2().unwrap();
    assert_eq!(again[(3, 5)], want[3][5]);
}

#[test]
fn kedit_stats_reuses_its_cache_and_rebuilds_a_damaged_one() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let model = fixture("tiny-gpt2");
    let run = || {
        kedit(&[
            "stats",
            "-m",
            model.to_str().unwrap(),
            "--layers",
            "0,1",
            "--samples",
            "3",
            "--context",
            "64",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--json",
        ])
    };
    let parse = |out: &std::process::Output| -> Vec<serde_json::Value> {
        ok(out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let first = parse(&run());
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|l| l["computed"] == true));
    let second_out = run();
    let second = parse(&second_out);
    assert!(second.iter().all(|l| l["computed"] == false));
    assert_eq!(first[0]["path"], second[0]["path"]);
    assert_eq!(first[0]["mean_square"], second[0]["mean_square"]);

    // Flip one byte of the statistics: detected, warned about, recomputed.
    let path = std::path::PathBuf::from(first[1]["path"].as_str().unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let third_out = run();
    let third = parse(&third_out);
    let stderr = String::from_utf8_lossy(&third_out.stderr);
    assert!(
        stderr.contains("warning") && stderr.contains("checksum mismatch"),
        "{stderr}"
    );
    assert_eq!(third[0]["computed"], false);
    assert_eq!(third[1]["computed"], true);
    assert_eq!(third[1]["mean_square"], first[1]["mean_square"]);

    // A truncated file too.
    std::fs::write(&path, &bytes[..10]).unwrap();
    let fourth_out = run();
    assert!(String::from_utf8_lossy(&fourth_out.stderr).contains("warning"));
    assert_eq!(parse(&fourth_out)[1]["computed"], true);

    let bad = kedit(&[
        "stats",
        "-m",
        model.to_str().unwrap(),
        "--layers",
        "7",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert_one_line_error(&bad, &["layer 7 is out of range"]);
}
