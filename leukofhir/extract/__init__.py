"""Every way data comes in: the window's searches, Bulk Data `$export`, files read offline, the lapse sweep."""
