-- How a trained classifier was made (full, lora, head) and, for a LoRA adapter, its rank: the
-- API shows both, and a model that adapters run over cannot be deleted while they exist.
alter table models add column method text;
alter table models add column lora_rank integer;
