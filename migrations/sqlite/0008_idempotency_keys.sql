-- Idempotency keys of `POST /v1/jobs`: a request retried with the same `Idempotency-Key` gets
-- the job the first one queued instead of queueing a second. A key is written in the same
-- transaction as its job, and honoured for 24 hours.
create table idempotency_keys (
    key text primary key,
    -- SHA-256 of the request, to tell a retry from a different request under the same key.
    request_hash text not null,
    job_id text not null,
    created_at integer not null
);
-- Expired keys are removed whenever a new one is written.
create index idempotency_keys_created on idempotency_keys (created_at);
