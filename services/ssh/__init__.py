"""SSH homes: SFTP/SCP/rsync-only accounts with quotas, and ingest of a path from a home."""
