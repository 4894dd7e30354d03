"""Views: HTML, text and plots rendered from plain dicts; they import nothing above the math."""
