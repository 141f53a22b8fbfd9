-- The architecture of a model pre-trained from scratch (mlm jobs with a `config`).
alter table jobs add column config text;
