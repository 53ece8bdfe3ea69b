"""One script per dashboard page, run by `st.navigation` (dashboards/app.py); each renders its view."""
