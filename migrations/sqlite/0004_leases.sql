-- Many workers share the queue: a running job records the worker that claimed it and until when
-- that worker's lease holds. A worker renews its lease while it trains; a job whose lease ran out
-- (its worker died) is claimed again by another worker and resumes from its newest checkpoint.
alter table jobs add column worker text;
alter table jobs add column lease_expires_at integer;
