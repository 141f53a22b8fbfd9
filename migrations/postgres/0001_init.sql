-- The same schema as migrations/sqlite, in Postgres' types. Integers are bigint (sqlx's Any
-- driver reads them as i64 on both), JSON is text as in SQLite, and `datasets` keeps an
-- insertion order in a `rowid` column, as SQLite's implicit rowid does there.

create table datasets (
    rowid       bigserial not null unique,
    id          text primary key,
    name        text not null,
    format      text not null,
    rows        bigint not null,
    labels      text not null,
    multi_label bigint not null default 0,
    bytes       bigint not null,
    path        text not null,
    created_at  bigint not null
);

create table jobs (
    seq                bigserial primary key,
    id                 text not null unique,
    task               text not null,
    status             text not null check (status in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    base_model         text not null,
    training_dataset   text not null,
    validation_dataset text,
    model_name         text,
    hyperparameters    text not null,
    progress           text,
    metrics            text,
    model              text,
    error              text,
    created_at         bigint not null,
    started_at         bigint,
    finished_at        bigint,
    config             text,
    webhook_url        text,
    worker             text,
    lease_expires_at   bigint
);
create index jobs_status on jobs (status, seq);

create table job_events (
    seq        bigserial primary key,
    job_id     text not null,
    created_at bigint not null,
    level      text not null,
    type       text not null,
    message    text not null,
    data       text
);
create index job_events_job on job_events (job_id, seq);

create table train_metrics (
    job_id        text not null,
    step          bigint not null,
    epoch         bigint not null,
    loss          double precision not null,
    learning_rate double precision not null,
    primary key (job_id, step)
);

create table validation_metrics (
    job_id text not null,
    epoch  bigint not null,
    data   text not null,
    primary key (job_id, epoch)
);

create table models (
    id          text primary key,
    kind        text not null,
    task        text,
    base_model  text,
    job_id      text,
    labels      text not null,
    metrics     text,
    path        text not null,
    pooling     text,
    max_seq_len bigint,
    created_at  bigint not null
);

-- Webhooks: each state change of a job with a webhook URL goes into the outbox in the same
-- transaction as the change itself (see migrations/sqlite/0003_webhooks.sql).
create table webhook_outbox (
    id bigserial primary key,
    job_id text not null,
    status text not null,
    attempts bigint not null default 0,
    next_attempt_at bigint not null default 0,
    created_at bigint not null
);
create index webhook_outbox_job on webhook_outbox (job_id, id);

create function jobs_webhook_outbox() returns trigger language plpgsql as $$
begin
    if new.webhook_url is not null and (tg_op = 'INSERT' or new.status is distinct from old.status) then
        insert into webhook_outbox (job_id, status, created_at)
        values (new.id, new.status, extract(epoch from now())::bigint);
    end if;
    return new;
end;
$$;

create trigger jobs_webhook_on_insert after insert on jobs
for each row execute function jobs_webhook_outbox();

create trigger jobs_webhook_on_status after update of status on jobs
for each row execute function jobs_webhook_outbox();
