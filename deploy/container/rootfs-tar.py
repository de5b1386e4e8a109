#!/usr/bin/env python3
"""Packs the staged root file system of the Lode image into a tar for `docker import`.

    rootfs-tar.py ROOTFS OUT.tar

Every file belongs to root, as staged, with three exceptions that no build context can express
without root on the building machine (a Dockerfile COPY drops file capabilities):
- /etc/passwd and /etc/group name the service user `lode` (10001) and the plugin user
  `lode-plugin` (10002), which must differ;
- /var/lib/lode, where each service's volume is mounted, belongs to `lode` with mode 0700 (a new
  named volume takes the ownership and mode of the image's directory);
- /usr/local/bin/lode-datanode carries the file capabilities CAP_SETUID and CAP_SETGID as
  permitted only, never effective: the datanode, running as `lode`, passes them on to the plugin
  host as ambient capabilities, and the plugin host uses them once, to become `lode-plugin`,
  then drops every capability before any plugin code runs.
"""

import io
import os
import sys
import tarfile

LODE_UID = 10001
PLUGIN_UID = 10002
CAP_SETGID = 6
CAP_SETUID = 7

PASSWD = f"""root:x:0:0:root:/:/nonexistent
lode:x:{LODE_UID}:{LODE_UID}:Lode services:/var/lib/lode:/nonexistent
lode-plugin:x:{PLUGIN_UID}:{PLUGIN_UID}:Lode plugins:/nonexistent:/nonexistent
nobody:x:65534:65534:nobody:/nonexistent:/nonexistent
"""
GROUP = f"""root:x:0:
lode:x:{LODE_UID}:
lode-plugin:x:{PLUGIN_UID}:
nogroup:x:65534:
"""


def capability_xattr(caps):
    """security.capability, revision 2 (VFS_CAP_REVISION_2), permitted only (no effective flag)."""
    permitted = sum(1 << c for c in caps)
    words = [0x02000000, permitted & 0xFFFFFFFF, 0, permitted >> 32, 0]
    return b"".join(w.to_bytes(4, "little") for w in words)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: rootfs-tar.py ROOTFS OUT.tar")
    root, out = sys.argv[1], sys.argv[2]
    special = {"etc/passwd": PASSWD, "etc/group": GROUP}
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:

        def add(path, rel):
            if rel in special:
                return
            info = tar.gettarinfo(path, arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            if rel == "var/lib/lode":
                info.uid = info.gid = LODE_UID
                info.uname = info.gname = "lode"
                info.mode = 0o700
            if rel == "usr/local/bin/lode-datanode":
                value = capability_xattr([CAP_SETUID, CAP_SETGID])
                info.pax_headers["SCHILY.xattr.security.capability"] = value.decode(
                    "utf-8", "surrogateescape"
                )
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)

        # Top down, in name order: each directory before what it holds.
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            if rel_dir != ".":
                add(dirpath, rel_dir)
            for name in sorted(filenames):
                add(os.path.join(dirpath, name), os.path.join(rel_dir, name) if rel_dir != "." else name)
        for rel, text in special.items():
            data = text.encode()
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    main()
