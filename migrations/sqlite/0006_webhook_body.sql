-- The body of a webhook delivery is fixed at its first attempt, so that every retry sends the
-- same bytes (and the same signature) as the attempt the receiver may already have seen.
alter table webhook_outbox add column body text;
