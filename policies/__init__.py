"""trimtab's built-in policies; each is a plugin like any third party's."""
