//! Prints the batches our trainer runs, epoch by epoch, for sequences of the lengths read from
//! stdin (one per line), as JSON `[[batch, …], …]` (one list per epoch). `bench/fixed_order_ref.py`
//! trains PyTorch on this order, so that the two trainers' losses can be compared step by step.
//! Usage: batch_order BATCH_SIZE SEED EPOCHS GROUP_BY_LENGTH(0|1) < lengths.txt

use std::io::Read;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let [batch, seed, epochs, group] = args[..] else { anyhow::bail!("usage: batch_order BATCH_SIZE SEED EPOCHS GROUP_BY_LENGTH") };
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let lengths: Vec<usize> = input.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
    let order: Vec<Vec<Vec<usize>>> =
        (0..epochs).map(|e| finetuned::train::data::batch_order(&lengths, batch, seed as u64, e, group == 1)).collect();
    println!("{}", serde_json::to_string(&order)?);
    Ok(())
}
