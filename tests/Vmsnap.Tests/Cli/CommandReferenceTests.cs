using System.CommandLine;
using System.CommandLine.Help;
using System.Text;
using System.Text.RegularExpressions;
using Vmsnap.Cli;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Cli;

/// <summary>
/// The manual page (<c>vmsnap --help-man</c>) and the bash completion script (<c>--help-bash-completion</c>) that
/// the .deb ships, as the vmsnap command prints them (the native one with VMSNAP_BIN), against the command
/// definitions: groff renders the page without a warning and it documents every command, argument and option;
/// bash, given the script, completes commands, options and their choices.
/// </summary>
[Trait("Category", "Unit")]
public partial class CommandReferenceTests
{
    private static readonly RootCommand Root = VmsnapCommand.Create();

    private static string Print(string option)
    {
        Tool.Result r = VmsnapCli.Run([option]);
        Assert.True(r.ExitCode == 0 && r.Stderr.Length == 0, $"vmsnap {option} exited {r.ExitCode}: {r.Stderr}");
        return r.Stdout;
    }

    [Fact]
    public void The_manual_page_renders_without_warnings_and_documents_every_command_argument_and_option()
    {
        using var dir = new TempDir();
        string page = dir.File("vmsnap.1");
        File.WriteAllText(page, Print("--help-man"));

        Tool.Result lint = Tool.Run("groff", ["-man", "-ww", "-z", page]);
        Assert.True(lint.ExitCode == 0 && lint.Stderr.Length == 0, $"groff warns about the manual page: {lint.Stderr}");

        // As a reader sees it: plain text, no hyphenation, whitespace runs made single spaces.
        Tool.Result shown = Tool.Run("groff", ["-man", "-Tutf8", "-rHY=0", "-P-cbou", page]);
        Assert.Equal(0, shown.ExitCode);
        string text = Spaces().Replace(shown.Stdout.Replace('\u2212', '-').Replace('\u2010', '-'), " ");
        Assert.StartsWith("VMSNAP(1) User Commands VMSNAP(1) NAME vmsnap - save and load virtual-machine state", text);
        foreach (string section in new[] { "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "EXIT STATUS", "SEE ALSO" }) Assert.Contains($" {section} ", text);

        // Each command's section, in the order of the definitions: its description, arguments and own options.
        CommandReference.Entry[] entries = [.. CommandReference.Commands(Root)];
        int[] starts = new int[entries.Length + 1];
        int at = text.IndexOf(" COMMANDS ", StringComparison.Ordinal);
        for (int i = 0; i < entries.Length; i++)
        {
            at = text.IndexOf($"vmsnap {entries[i].Path} ", at + 1, StringComparison.Ordinal);
            Assert.True(at >= 0, $"the manual page has no section for 'vmsnap {entries[i].Path}' (or not in the definitions' order)");
            starts[i] = at;
        }
        starts[^1] = text.IndexOf(" OPTIONS ", at, StringComparison.Ordinal);
        for (int i = 0; i < entries.Length; i++)
        {
            Command c = entries[i].Command;
            string section = text[starts[i]..starts[i + 1]];
            Assert.Contains(Flat(c.Description!), section);
            foreach (Argument a in c.Arguments)
                Assert.Contains($"{a.Name} {Flat(a.Description!)}", section);
            // An option: its names, its value's name (one word) if it takes one, its description.
            foreach (Option o in c.Subcommands.Count > 0 ? [] : CommandReference.OptionsOf(c).Where(o => !o.Recursive))
                Assert.Matches(OptionEntry(o), section);
        }
        string options = text[starts[^1]..];
        foreach (Option o in Root.Options.Where(o => !o.Hidden))
            Assert.Matches(OptionEntry(o), options);
        foreach (var (code, meaning) in global::Vmsnap.Cli.Cli.ExitCodes) Assert.Contains($"{code} {Flat(meaning)}", text);
        Assert.Contains("--version", text);
        Assert.DoesNotContain("--help-man", text);
        Assert.DoesNotContain("--help-bash-completion", text);
    }

    [Fact]
    public void Bash_completes_commands_options_and_choices_with_the_script()
    {
        using var dir = new TempDir();
        string script = dir.File("vmsnap.bash");
        File.WriteAllText(script, Print("--help-bash-completion"));

        // Each case: the words typed (the last one being completed) and what bash must offer, sorted.
        var cases = new List<(string[] Words, string[] Expected)>
        {
            (["vmsnap", ""], [.. Root.Subcommands.Select(c => c.Name)]),
            (["vmsnap", "sn"], ["snapshot"]),
            (["vmsnap", "snapshot", ""], ["apply", "create", "delete", "list"]),
            (["vmsnap", "create", "vm.qcow2", "1G", "--compat", ""], ["0.10", "1.1"]),
            (["vmsnap", "check", "vm.qcow2", "-r", "l"], ["leaks"]),
            (["vmsnap", "info", "--output", "="], ["human", "json"]),
            (["vmsnap", "info", "--output", "=", "j"], ["json"]),
            (["vmsnap", "save", "vm.qcow2", "--mode", ""], ["buffered", "gather"]),
            (["vmsnap", "--v"], ["--version"]),
        };
        // Every command's long options, as its definition lists them (its own and those passed down).
        foreach (CommandReference.Entry e in CommandReference.Commands(Root).Where(e => e.Command.Subcommands.Count == 0))
        {
            string[] longOptions = [.. CommandReference.OptionsOf(e.Command).SelectMany(o => o.Aliases.Prepend(o.Name)).Where(n => n.StartsWith("--", StringComparison.Ordinal)).Distinct()];
            cases.Add(((string[])["vmsnap", .. e.Path.Split(" "), "--"], longOptions));
        }

        var driver = new StringBuilder();
        driver.Append("source ").Append(script).Append('\n');
        driver.Append("t() { COMP_WORDS=(\"$@\"); COMP_CWORD=$(( $# - 1 )); COMPREPLY=(); _vmsnap; printf '%s\\n' \"${COMPREPLY[*]}\"; }\n");
        foreach (var (words, _) in cases) driver.Append("t ").Append(string.Join(' ', words.Select(w => $"'{w}'"))).Append('\n');
        string driverPath = dir.File("driver.bash");
        File.WriteAllText(driverPath, driver.ToString());
        Tool.Result r = Tool.Run("bash", [driverPath]);
        Assert.True(r.ExitCode == 0 && r.Stderr.Length == 0, $"bash: {r.Stderr}");

        string[] offered = r.Stdout.Split('\n')[..cases.Count];
        for (int i = 0; i < cases.Count; i++)
        {
            string[] got = [.. offered[i].Split(' ', StringSplitOptions.RemoveEmptyEntries).Order(StringComparer.Ordinal)];
            Assert.True(got.SequenceEqual(cases[i].Expected.Order(StringComparer.Ordinal)),
                $"completing '{string.Join(' ', cases[i].Words)}' offered [{string.Join(' ', got)}], expected [{string.Join(' ', cases[i].Expected.Order(StringComparer.Ordinal))}]");
        }
    }

    private static Regex OptionEntry(Option o) => new(Regex.Escape(o.Name) + "( [^ ]+)? " + Regex.Escape(Flat(o.Description!)));

    private static string Flat(string text) => Spaces().Replace(text, " ").Trim();

    [GeneratedRegex(@"\s+")]
    private static partial Regex Spaces();
}
