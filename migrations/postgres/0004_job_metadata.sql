-- See migrations/sqlite/0007_job_metadata.sql.
alter table jobs add column metadata text;

create table job_metadata (
    job_id text not null,
    key text not null,
    value text not null,
    primary key (job_id, key)
);
create index job_metadata_pair on job_metadata (key, value);
