-- The line of a dataset's first label that is not a number (null: every label is one, or none);
-- a regression job is refused on such a dataset, naming the line.
alter table datasets add column text_label_line integer;
-- What a dataset's rows hold: texts, pairs (of texts) or tokens (tagged words); null for one stored
-- before it was recorded (texts or pairs).
alter table datasets add column kind text;
