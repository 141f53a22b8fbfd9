-- See migrations/sqlite/0006_webhook_body.sql.
alter table webhook_outbox add column body text;
