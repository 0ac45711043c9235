"""PostgreSQL access: the pool owner, the embedded server, migrations and named queries."""

from halldyll_ray.db.database import Database
from halldyll_ray.db.embedded import EmbeddedPostgres
from halldyll_ray.db.migrate import apply_migrations, load_migrations

__all__ = ["Database", "EmbeddedPostgres", "apply_migrations", "load_migrations"]
