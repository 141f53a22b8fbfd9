-- The line of a dataset's first label that is not a number (null: every label is one, or none);
-- a regression job is refused on such a dataset, naming the line.
alter table datasets add column text_label_line integer;
