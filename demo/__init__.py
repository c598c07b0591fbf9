"""The roof: `luna demo` runs every stage (the only package that imports them all) and writes report.html."""
