-- See migrations/sqlite/0008_idempotency_keys.sql.
create table idempotency_keys (
    key text primary key,
    request_hash text not null,
    job_id text not null,
    created_at bigint not null
);
-- Expired keys are removed whenever a new one is written.
create index idempotency_keys_created on idempotency_keys (created_at);
