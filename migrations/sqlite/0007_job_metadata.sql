-- Job metadata: up to 16 string pairs a caller attaches to a job (as OpenAI's fine-tuning jobs
-- have). `jobs.metadata` holds them as the job object shows them; `job_metadata` holds one row
-- a pair, so that the job list can filter by them on either database.
alter table jobs add column metadata text;

create table job_metadata (
    job_id text not null,
    key text not null,
    value text not null,
    primary key (job_id, key)
);
create index job_metadata_pair on job_metadata (key, value);
