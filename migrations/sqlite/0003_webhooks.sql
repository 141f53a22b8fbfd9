-- Webhooks: a job may name a URL that gets a POST on each of its state changes. Triggers write
-- each change into an outbox in the same transaction as the change itself, so no change is
-- missed, and a dispatcher delivers the outbox in order, with retries, across restarts.
alter table jobs add column webhook_url text;

create table webhook_outbox (
    id integer primary key autoincrement,
    job_id text not null,
    status text not null,
    attempts integer not null default 0,
    -- Unix milliseconds before which the row is not tried again.
    next_attempt_at integer not null default 0,
    created_at integer not null
);
create index webhook_outbox_job on webhook_outbox (job_id, id);

create trigger jobs_webhook_on_insert after insert on jobs
when new.webhook_url is not null
begin
    insert into webhook_outbox (job_id, status, created_at) values (new.id, new.status, strftime('%s', 'now'));
end;

create trigger jobs_webhook_on_status after update of status on jobs
when new.webhook_url is not null and new.status is not old.status
begin
    insert into webhook_outbox (job_id, status, created_at) values (new.id, new.status, strftime('%s', 'now'));
end;
