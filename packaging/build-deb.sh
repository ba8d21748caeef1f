#!/usr/bin/env bash
# Builds vmsnap as one native executable (.NET native AOT, linux-x64) and packages it, into OUT-DIR
# (default: artifacts/):
#   vmsnap_VERSION_amd64.deb        /usr/bin/vmsnap, the manual page vmsnap(1), bash completion, the
#                                   licence (/usr/share/doc/vmsnap/copyright) and the changelog;
#                                   apt install ./vmsnap_VERSION_amd64.deb
#   vmsnap-VERSION-linux-x64.tar.gz the same files under vmsnap-VERSION/ (bin/, share/): e.g.
#                                   tar -xzf vmsnap-VERSION-linux-x64.tar.gz -C /usr/local --strip-components=1
#   linux-x64/vmsnap                the executable alone (what tests and benchmarks run)
# The manual page and the completion script come from the executable itself (vmsnap --help-man,
# --help-bash-completion), written from the command definitions the parser uses. Needs the .NET SDK,
# a C toolchain (the AOT compiler links with gcc or clang), dpkg-deb and objdump; not root.
# File dates are the last commit's (SOURCE_DATE_EPOCH), so the same commit gives the same package.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root/artifacts}" && cd "${1:-$root/artifacts}" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)}"

dotnet publish "$root/src/Vmsnap.Cli" -c Release -r linux-x64 -p:PublishAot=true -o "$work/publish" -nologo -v quiet >&2
bin="$work/publish/vmsnap"
version="$("$bin" --version)"
version="${version%%+*}"

# The changelog's newest entry must be this version (packaging/changelog, Debian's format).
logged="$(sed -n '1s/^vmsnap (\([^)]*\)).*/\1/p' "$root/packaging/changelog")"
if [ "$logged" != "$version" ]; then
  echo "packaging/build-deb.sh: vmsnap is $version but packaging/changelog's newest entry is '$logged': add an entry" >&2
  exit 1
fi

# The executable links only the C library (libc, libm): anything else would be a dependency to declare.
extra="$(objdump -p "$bin" | awk '$1 == "NEEDED" { print $2 }' | grep -v -E '^(libc|libm)\.so\.6$|^ld-linux' || true)"
if [ -n "$extra" ]; then
  echo "packaging/build-deb.sh: vmsnap links $extra besides the C library; declare it in Depends" >&2
  exit 1
fi
glibc="$(objdump -T "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)"

# The tree both packages hold, under usr/.
pkg="$work/pkg"
doc="$pkg/usr/share/doc/vmsnap"
install -d "$pkg/usr/bin" "$pkg/usr/share/man/man1" "$pkg/usr/share/bash-completion/completions" "$doc" "$pkg/DEBIAN"
install -m 0755 "$bin" "$pkg/usr/bin/vmsnap"
"$bin" --help-man | gzip -9n > "$pkg/usr/share/man/man1/vmsnap.1.gz"
"$bin" --help-bash-completion > "$pkg/usr/share/bash-completion/completions/vmsnap"
{
  cat "$root/packaging/copyright"
  # The MIT licence's text, as the repository's LICENSE has it (after its title and copyright line).
  echo
  echo "License: MIT"
  sed -n '/^Permission is hereby granted/,$p' "$root/LICENSE" | sed -e 's/^$/./' -e 's/^/ /'
} > "$doc/copyright"
gzip -9n < "$root/packaging/changelog" > "$doc/changelog.gz"
chmod 0644 "$pkg/usr/share/man/man1/vmsnap.1.gz" "$pkg/usr/share/bash-completion/completions/vmsnap" "$doc/copyright" "$doc/changelog.gz"

cat > "$pkg/DEBIAN/control" <<EOF
Package: vmsnap
Version: $version
Architecture: amd64
Maintainer: The vmsnap authors <vmsnap@users.noreply.invalid>
Installed-Size: $(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
Depends: libc6 (>= $glibc)
Suggests: qemu-system-x86, qemu-utils
Section: admin
Priority: optional
Description: save and load virtual-machine state as qcow2 internal snapshots
 vmsnap saves and loads virtual-machine state as qcow2 internal snapshots, in
 QEMU's own formats and as fast as the disk allows: qemu-system-x86_64 -loadvm
 restores what vmsnap saved, and vmsnap loads what QEMU saved. It also saves
 and restores running QEMU guests over QMP (savevm --live, loadvm), and
 inspects, checks and edits qcow2 images with qemu-img's JSON.
 .
 One native executable: no .NET runtime is needed.
EOF
(cd "$pkg" && find usr -type f | LC_ALL=C sort | xargs md5sum) > "$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/control" "$pkg/DEBIAN/md5sums"
find "$pkg" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

deb="$out/vmsnap_${version}_amd64.deb"
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >&2

# The tarball: the same files, laid out for a prefix (bin/, share/).
name="vmsnap-$version"
mkdir -p "$work/tar/$name"
cp -a "$pkg/usr/." "$work/tar/$name/"
tarball="$out/$name-linux-x64.tar.gz"
tar -C "$work/tar" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" -cf - "$name" | gzip -9n > "$tarball"

mkdir -p "$out/linux-x64"
install -m 0755 "$bin" "$out/linux-x64/vmsnap"
echo "$deb"
echo "$tarball"
echo "$out/linux-x64/vmsnap"
