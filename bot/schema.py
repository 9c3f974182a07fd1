"""The history store's schema, as numbered migrations applied in order."""

from __future__ import annotations

__all__ = ["MIGRATIONS"]

MIGRATIONS: tuple[str, ...] = (
    # 1: images, messages, inbox, jobs
    """
    CREATE TABLE images (
        sha256      TEXT PRIMARY KEY,          -- of the bytes as received; the file's name
        mime        TEXT NOT NULL,
        width       INTEGER NOT NULL,
        height      INTEGER NOT NULL,
        size        INTEGER NOT NULL,
        first_seen  REAL NOT NULL
    );
    CREATE TABLE messages (
        id          INTEGER PRIMARY KEY,       -- insertion order is chat order
        platform    TEXT NOT NULL,
        chat_id     TEXT NOT NULL,
        message_id  TEXT NOT NULL,
        thread_id   TEXT,
        reply_to    TEXT,
        sender_id   TEXT NOT NULL,
        sender_name TEXT NOT NULL,
        role        TEXT NOT NULL CHECK (role IN ('user', 'bot')),
        text        TEXT NOT NULL,
        job_id      TEXT,                      -- bot messages: the job they answer
        meta        TEXT NOT NULL DEFAULT '{}',
        created_at  REAL NOT NULL,
        UNIQUE (platform, chat_id, message_id)
    );
    CREATE INDEX messages_thread ON messages (platform, chat_id, thread_id, id);
    CREATE INDEX messages_time ON messages (platform, chat_id, created_at);
    CREATE INDEX messages_job ON messages (job_id) WHERE job_id IS NOT NULL;
    CREATE TABLE message_images (
        message     INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        position    INTEGER NOT NULL,
        sha256      TEXT NOT NULL REFERENCES images (sha256),
        PRIMARY KEY (message, position)
    );
    CREATE INDEX message_images_sha ON message_images (sha256);
    CREATE TABLE inbox (
        id          INTEGER PRIMARY KEY,
        platform    TEXT NOT NULL,
        event_id    TEXT NOT NULL,
        chat_id     TEXT NOT NULL,
        message_id  TEXT NOT NULL,
        payload     TEXT NOT NULL,             -- the Incoming as JSON, image bytes left out
        received_at REAL NOT NULL,
        processed_at REAL,
        UNIQUE (platform, event_id),
        UNIQUE (platform, chat_id, message_id)
    );
    CREATE TABLE jobs (
        seq         INTEGER PRIMARY KEY,       -- queue order
        id          TEXT NOT NULL UNIQUE,
        question    INTEGER NOT NULL REFERENCES messages (id),
        conversation TEXT NOT NULL,            -- jobs of one conversation run one at a time, in order
        status      TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
        attempts    INTEGER NOT NULL DEFAULT 0,
        context     TEXT NOT NULL,             -- JSON: which rule chose the images, earlier turns
        answer      TEXT,
        error       TEXT,
        answer_message_id TEXT,
        created_at  REAL NOT NULL,
        started_at  REAL,
        finished_at REAL
    );
    CREATE INDEX jobs_open ON jobs (status, seq);
    CREATE INDEX jobs_conversation ON jobs (conversation, seq);
    CREATE INDEX jobs_question ON jobs (question);
    CREATE TABLE job_images (
        job         TEXT NOT NULL REFERENCES jobs (id),
        position    INTEGER NOT NULL,
        sha256      TEXT NOT NULL REFERENCES images (sha256),
        PRIMARY KEY (job, position)
    );
    """,
    # 2: outbox, fair turns between conversations, back-off, refusals, sender index
    """
    CREATE TABLE outbox (
        id          INTEGER PRIMARY KEY,       -- send order
        job         TEXT NOT NULL REFERENCES jobs (id),
        kind        TEXT NOT NULL CHECK (kind IN ('answer', 'notice')),  -- a notice comes before the answer
        conversation TEXT NOT NULL,            -- a conversation's replies are sent one at a time, in order
        text        TEXT NOT NULL,
        failed      INTEGER NOT NULL,          -- the reply says the question could not be answered
        status      TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'dead')),
        attempts    INTEGER NOT NULL DEFAULT 0,
        next_at     REAL NOT NULL,             -- not sent before (back-off after a failed send)
        sent_message_id TEXT,                  -- the platform's id for what it accepted
        error       TEXT,
        created_at  REAL NOT NULL,
        sent_at     REAL,
        UNIQUE (job, kind)
    );
    CREATE INDEX outbox_pending ON outbox (conversation, id) WHERE status = 'pending';
    CREATE TABLE conversations (
        conversation TEXT PRIMARY KEY,
        last_served INTEGER NOT NULL           -- a counter: the least recently served goes first
    );
    CREATE INDEX conversations_served ON conversations (last_served);
    ALTER TABLE jobs ADD COLUMN not_before REAL;   -- back-off while the model host is unreachable
    ALTER TABLE jobs ADD COLUMN refused TEXT;      -- turned away (busy, rate limit): never ran
    ALTER TABLE jobs ADD COLUMN draft_message_id TEXT;  -- the placeholder shown while answering
    CREATE INDEX jobs_queued ON jobs (conversation, seq) WHERE status = 'queued';
    CREATE INDEX jobs_running ON jobs (conversation) WHERE status = 'running';
    CREATE INDEX messages_sender ON messages (platform, sender_id, created_at);
    """,
    # 3: what an answer cost in tokens (JSON [prompt, answer]), where the engine counted it
    """
    ALTER TABLE jobs ADD COLUMN usage TEXT;
    """,
)
