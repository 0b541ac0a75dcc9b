"""Copy a released OpenMoE T5X checkpoint (or any gs:// / fsspec directory) somewhere else.

  python launch/download.py openmoe-base /data/openmoe-base/checkpoint_500000 --params_only
  python launch/download.py gs://openmoe/openmoe-8b/checkpoint_100000 gs://my-bucket/om8b

Parallel, resumable (run the same command again after an interruption), verified (size + GCS
MD5), with a progress bar. The OpenMoE README notes GCS downloads are not free (egress).
"""
import argparse
import sys

from openmoe_jax import download


def _released() -> str:
  lines = ["released checkpoints (github.com/XueFuzhao/OpenMoE README, 'Model Weights'):"]
  for name, r in download.RELEASED.items():
    lines.append(f"  {name:15s} {r['path']}  params {r['params']}; ~{r['est_gb']} GB of "
                 "float32 parameters (our estimate, not published)")
  lines.append("Download sizes are not published: the estimate is parameters x 4 bytes before "
               "gzip, without the Adafactor state (skipped by --params_only); the exact total "
               "is printed from the bucket listing.")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, epilog=_released(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src", help="a released name above, a gs:// URL or any fsspec path "
                      "of a T5X checkpoint_N directory")
  parser.add_argument("dst", help="local directory or gs:// URL to copy into")
  parser.add_argument("--params_only", action="store_true",
                      help="fetch 'checkpoint' + target.* arrays only, skip optimizer state")
  parser.add_argument("--jobs", type=int, default=8, help="files copied in parallel")
  parser.add_argument("--chunk_mb", type=int, default=8, help="bytes per ranged read (MiB)")
  parser.add_argument("--token", default=None,
                      help="gcsfs token: 'anon', 'google_default', a JSON key file; "
                           "default: gcsfs's own choice (credentials if any, else anonymous)")
  parser.add_argument("--project", default=None, help="GCP project (requester-pays billing)")
  parser.add_argument("--requester_pays", action="store_true", help="bill reads to --project")
  args = parser.parse_args(argv)
  src = download.RELEASED.get(args.src, {}).get("path", args.src)
  stats = download.download(src, args.dst, jobs=args.jobs, params_only=args.params_only,
                            chunk_bytes=args.chunk_mb << 20, token=args.token,
                            project=args.project, requester_pays=args.requester_pays)
  print(f"{src} -> {args.dst}: {stats['total_bytes']:,} bytes verified, "
        f"{stats['fetched_bytes']:,} fetched now, {len(stats['skipped'])} files already there")
  return 0


if __name__ == "__main__":
  sys.exit(main())
