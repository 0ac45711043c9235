"""Storage: the PostgreSQL pool owner, the embedded server, migrations, the cache tiers
(in-process LRU and Redis) and the named SQL of every component (``storage/sql/*.sql``).

Nothing here knows users, memories or permissions; the components of
:mod:`halldyll_ray.components` do, over these.
"""

from halldyll_ray.storage.database import Database
from halldyll_ray.storage.embedded import EmbeddedPostgres
from halldyll_ray.storage.migrate import apply_migrations, load_migrations

__all__ = ["Database", "EmbeddedPostgres", "apply_migrations", "load_migrations"]
