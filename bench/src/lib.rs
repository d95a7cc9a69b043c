//! xlb's measurements. Figures are reported, never asserted (DEVELOPERS.md): each run
//! measures a baseline in the same process and reports ratios to it.
