-- The torture suite's database (tests/torture.rs), also part 2 of make demo
-- (scripts/demo.sh): a task queue, its runs and events, and per-writer counters.
CREATE TABLE tasks(id INTEGER PRIMARY KEY, status TEXT NOT NULL, worker INT, updated INT, payload TEXT);
CREATE TABLE runs(id INTEGER PRIMARY KEY, task_id INT, worker INT, tag TEXT, n INT, status TEXT, note TEXT);
CREATE TABLE events(id INTEGER PRIMARY KEY, run_id INT, kind TEXT, payload TEXT);
CREATE TABLE counters(worker INTEGER PRIMARY KEY, n INT NOT NULL);
CREATE INDEX idx_tasks_status ON tasks(status, updated);
CREATE INDEX idx_runs_status ON runs(status, worker);
CREATE INDEX idx_runs_task ON runs(task_id);
CREATE UNIQUE INDEX idx_runs_tag ON runs(tag);
CREATE INDEX idx_events_run ON events(run_id, kind);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 600)
  INSERT INTO tasks(status, updated, payload) SELECT 'todo', i, hex(randomblob(150)) FROM n;
