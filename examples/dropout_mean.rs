//! Dropout's effect at fixed weights, to compare with PyTorch (`bench/dropout_mean.py`): the
//! loss of one batch in eval mode, then the mean over `N` dropout draws of the train-mode loss
//! and of the global gradient norm (what clipping reads), with their standard errors.
//! Usage: cargo run --release --example dropout_mean -- CLASSIFIER_DIR DATA_JSONL N

use candle_core::{Device, Tensor};
use finetuned::model::encoder::encoder_params;
use finetuned::model::encoder::params::Params;
use finetuned::model::hf::artifacts::{inspect, load_weights};
use finetuned::model::hf::tokenize::{encode_pairs, load_tokenizer, pad_batch_typed};
use finetuned::model::ops::layers::Mode;
use finetuned::model::{Classifier, Pooling};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn mean_se(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, (var / n).sqrt())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (dir, data, n) = (std::path::Path::new(&args[1]), &args[2], args[3].parse::<usize>()?);
    let cfg = inspect(dir)?.config;
    let weights = load_weights(dir, &Device::Cpu)?;
    let (labels_n, h) = (weights["classifier.weight"].dim(0)?, cfg.hidden_size);
    let mut spec = encoder_params(&cfg);
    spec.extend([
        ("pooler.dense.weight".to_string(), vec![h, h]),
        ("pooler.dense.bias".to_string(), vec![h]),
        ("classifier.weight".to_string(), vec![labels_n, h]),
        ("classifier.bias".to_string(), vec![labels_n]),
    ]);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let params = Params::build(&cfg, &spec, &weights, &[], &mut rng, &Device::Cpu)?;
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(data)?.lines().take(32).map(serde_json::from_str).collect::<Result<_, _>>()?;
    let pairs: Vec<(&str, &str)> = rows.iter().map(|r| (r["text"].as_str().unwrap(), r["text_pair"].as_str().unwrap())).collect();
    let labels: Vec<u32> = rows.iter().map(|r| u32::from(r["label"] != "equivalent")).collect();
    let tok = load_tokenizer(dir)?;
    let enc = encode_pairs(&tok, &pairs, 128)?;
    let seqs: Vec<&[u32]> = enc.iter().map(|(s, _)| s.as_slice()).collect();
    let types: Vec<&[u32]> = enc.iter().map(|(_, t)| t.as_slice()).collect();
    let batch = pad_batch_typed(&seqs, &types, cfg.pad_token_id as u32, &Device::Cpu)?;
    let targets = Tensor::new(labels.as_slice(), &Device::Cpu)?;
    let model = Classifier::load(&|n| params.tracked(n), &cfg, Pooling::Cls)?;
    let eval = candle_nn::loss::cross_entropy(&model.forward(&batch.ids, &batch.type_ids, &batch.mask, &mut Mode::Eval)?, &targets)?;
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for draw in 0..n {
        let mut r = ChaCha8Rng::seed_from_u64(1000 + draw as u64);
        let logits = model.forward(&batch.ids, &batch.type_ids, &batch.mask, &mut Mode::Train(&mut r))?;
        let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
        let grads = loss.backward()?;
        let sq: f64 = params
            .vars
            .iter()
            .filter_map(|v| grads.get(v.as_tensor()))
            .map(|g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64)
            .sum();
        losses.push(loss.to_scalar::<f32>()? as f64);
        norms.push(sq.sqrt());
    }
    let ((lm, ls), (gm, gs)) = (mean_se(&losses), mean_se(&norms));
    println!("{{\"side\": \"ours\", \"eval_loss\": {:.6}, \"train_loss\": [{lm:.6}, {ls:.6}], \"grad_norm\": [{gm:.6}, {gs:.6}], \"draws\": {n}}}", eval.to_scalar::<f32>()?);
    Ok(())
}
