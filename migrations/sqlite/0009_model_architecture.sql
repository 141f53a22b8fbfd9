-- The encoder architecture (`model_type` of config.json) of a trained model, which the API lists.
alter table models add column architecture text;
