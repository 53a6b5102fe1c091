"""What the workers of one instance share: one table in shared memory that gunicorn's master
makes before it forks (`table.py`)."""
