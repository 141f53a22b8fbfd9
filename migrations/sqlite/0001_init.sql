-- Datasets, jobs with their events and metrics, and trained models.

create table datasets (
    id          text primary key,
    name        text not null,
    format      text not null,
    rows        integer not null,
    labels      text not null,          -- JSON object: label -> count
    multi_label integer not null default 0,
    bytes       integer not null,
    path        text not null,          -- normalised JSONL, relative to the data dir
    created_at  integer not null
);

create table jobs (
    seq                integer primary key autoincrement,
    id                 text not null unique,
    task               text not null,
    status             text not null check (status in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    base_model         text not null,
    training_dataset   text not null,
    validation_dataset text,
    model_name         text,
    hyperparameters    text not null,   -- JSON, every value resolved
    progress           text,            -- JSON
    metrics            text,            -- JSON
    model              text,
    error              text,            -- JSON {code, message}
    created_at         integer not null,
    started_at         integer,
    finished_at        integer
);
create index jobs_status on jobs (status, seq);

create table job_events (
    seq        integer primary key autoincrement,
    job_id     text not null,
    created_at integer not null,
    level      text not null,
    type       text not null,
    message    text not null,
    data       text
);
create index job_events_job on job_events (job_id, seq);

create table train_metrics (
    job_id        text not null,
    step          integer not null,
    epoch         integer not null,
    loss          real not null,
    learning_rate real not null,
    primary key (job_id, step)
);

create table validation_metrics (
    job_id text not null,
    epoch  integer not null,
    data   text not null,               -- JSON: step, loss, accuracy, macro_f1, per_class, confusion_matrix
    primary key (job_id, epoch)
);

create table models (
    id          text primary key,
    kind        text not null,
    task        text,
    base_model  text,
    job_id      text,
    labels      text not null,          -- JSON list
    metrics     text,                   -- JSON
    path        text not null,          -- relative to the data dir
    pooling     text,
    max_seq_len integer,
    created_at  integer not null
);
