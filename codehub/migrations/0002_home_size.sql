-- A per-workspace home size (MiB); NULL: docker.home_size_limit_mib. It applies to the
-- home file systems made from now on (the next provision or restore).
ALTER TABLE workspaces ADD COLUMN home_size_limit_mib integer
    CHECK (home_size_limit_mib > 0);
