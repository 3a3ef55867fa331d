-- An operation's checkpoint (model.Checkpoint), so that the archive's "committed, only the
-- volume's deletion is left" no longer lives in the progress text a user sees. A row caught
-- between the two by this upgrade keeps its place.
ALTER TABLE workspaces ADD COLUMN checkpoint text
    CHECK (checkpoint IN ('ARCHIVE_COMMITTED'));
UPDATE workspaces SET checkpoint = 'ARCHIVE_COMMITTED'
    WHERE operation = 'ARCHIVING' AND progress_phase = 'removing volume';
